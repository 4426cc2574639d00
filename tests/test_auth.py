"""Authentication: every protected route refuses every kind of bad token with 401, and writes nothing.
The algorithm is fixed by configuration (HS256 or RS256), never taken from the token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from preorder.auth import mint_token
from preorder.settings import Settings
from tests.conftest import ADMIN, SECRET, bearer, make_product, make_settings, serving

DROP = object()
OTHER_SECRET = "another-secret-that-is-also-long-enough-0123456789"


def claims(**over: Any) -> dict[str, Any]:
    """Admin claims by default: if a bad token were let through, the admin routes would write."""
    base: dict[str, Any] = {"sub": "admin-1", "role": "admin", "aud": "preorder", "exp": int(time.time()) + 3600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not DROP}


def hs256(payload: dict[str, Any], key: str = SECRET) -> str:
    return jwt.encode(payload, key, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forged(payload: dict[str, Any], *, alg: str, hmac_key: bytes | None = None) -> str:
    """A token built by hand: `alg: none` (unsigned), or HMAC-signed with any bytes (algorithm confusion)."""
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "." + _b64(json.dumps(payload).encode())
    if hmac_key is None:
        return head + "."
    return head + "." + _b64(hmac.new(hmac_key, head.encode(), hashlib.sha256).digest())


def tampered() -> str:
    """A real customer token whose payload is swapped for an admin one, keeping the old signature."""
    header, _, signature = hs256(claims(sub="U1", role="customer")).split(".")
    return f"{header}.{_b64(json.dumps(claims()).encode())}.{signature}"


def rsa_pems() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


STRANGER_PRIVATE, _ = rsa_pems()

# name -> Authorization header value (None: no header at all)
BAD_HS256 = {
    "missing-header": None,
    "not-a-jwt": "Bearer not-a-jwt",
    "empty-bearer": "Bearer ",
    "basic-scheme": "Basic " + base64.b64encode(b"admin:admin").decode(),
    "token-without-scheme": hs256(claims()),
    "expired": "Bearer " + hs256(claims(exp=int(time.time()) - 60)),
    "not-yet-valid": "Bearer " + hs256(claims(nbf=int(time.time()) + 3600)),
    "alg-none": "Bearer " + forged(claims(), alg="none"),
    "alg-none-capitalised": "Bearer " + forged(claims(), alg="None"),
    "wrong-audience": "Bearer " + hs256(claims(aud="another-service")),
    "missing-exp": "Bearer " + hs256(claims(exp=DROP)),
    "missing-sub": "Bearer " + hs256(claims(sub=DROP)),
    "missing-role": "Bearer " + hs256(claims(role=DROP)),
    "missing-aud": "Bearer " + hs256(claims(aud=DROP)),
    "wrong-key": "Bearer " + hs256(claims(), key=OTHER_SECRET),
    "rs256-token-to-hs256-service": "Bearer " + jwt.encode(claims(), STRANGER_PRIVATE, algorithm="RS256"),
    "unknown-role": "Bearer " + hs256(claims(role="superuser")),
    "subject-not-an-id": "Bearer " + hs256(claims(sub="admin-1}{")),
    "subject-with-nul": "Bearer " + hs256(claims(sub="admin\x00")),
    "tampered-payload": "Bearer " + tampered(),
}


def protected_calls(order_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every protected operation, each with a body that would write something if it were let through."""
    return [
        ("POST", "/api/preorder", {"product_id": "P1001", "quantity": 1, "user_id": "U1"}),
        ("GET", "/api/preorder", None),
        ("GET", f"/api/preorder/{order_id}", None),
        ("PUT", f"/api/preorder/{order_id}", {"status": "cancelled"}),
        ("DELETE", f"/api/preorder/{order_id}", None),
        ("GET", f"/api/preorder/{order_id}/events", None),
        ("POST", f"/api/preorder/{order_id}/payments",
         {"kind": "full", "reference": "PAY-AUTH", "amount": 2999, "currency": "USD"}),
        ("GET", f"/api/preorder/{order_id}/payments", None),
        ("GET", f"/api/preorder/{order_id}/refunds", None),
        ("POST", f"/api/preorder/{order_id}/refunds/7/succeeded", {"provider_reference": "RF-AUTH"}),
        ("POST", "/api/products", {"id": "P2002", "name": "New", "price_amount": 100, "total_stock": 5}),
        ("PATCH", "/api/products/P1001", {"total_stock": 1}),
        ("POST", "/api/webhooks", {"url": "http://127.0.0.1:9/hook"}),
        ("GET", "/api/webhooks", None),
        ("GET", f"/api/webhooks/{WID}", None),
        ("PATCH", f"/api/webhooks/{WID}", {"status": "paused"}),
        ("DELETE", f"/api/webhooks/{WID}", None),
        ("GET", f"/api/webhooks/{WID}/deliveries", None),
        ("POST", f"/api/webhooks/{WID}/deliveries/1/retry", None),
        ("GET", "/api/events", None),
        ("GET", "/api/audit", None),
    ]


WID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"  # an endpoint id: with a good token, these calls reach the 404


async def snapshot(db: asyncpg.Connection, redis: aioredis.Redis) -> dict[str, Any]:
    """Everything a request could have written: orders, events, products, refunds, idempotency, Redis."""
    return {
        "orders": [tuple(r) for r in await db.fetch("SELECT id, status, quantity FROM orders ORDER BY id")],
        "events": await db.fetchval("SELECT count(*) FROM order_events"),
        "products": [tuple(r) for r in await db.fetch("SELECT id, total_stock, updated_at FROM products ORDER BY id")],
        "refunds": await db.fetchval("SELECT count(*) FROM refunds"),
        "sinks": await db.fetchval("SELECT count(*) FROM event_sinks"),
        "idempotency": await db.fetchval("SELECT count(*) FROM idempotency_keys"),
        # Rate-window counters expire on their own (a 1 s window can end mid-test): everything else must not move.
        "redis": {k: await redis.dump(k) for k in sorted(await redis.keys("*")) if not _RATE_KEY.search(k)},
    }


_RATE_KEY = re.compile(rb":rl:|:rate$")


async def call(client: httpx.AsyncClient, method: str, url: str, body: Any, auth: str | None) -> httpx.Response:
    headers = {} if auth is None else {"Authorization": auth}
    return await client.request(method, url, json=body, headers=headers)


def assert_unauthorized(r: httpx.Response, what: str) -> None:
    assert r.status_code == 401, (what, r.status_code, r.text)
    assert r.headers["www-authenticate"] == "Bearer", what
    assert r.headers["content-type"] == "application/problem+json", what
    problem = r.json()
    assert problem["status"] == 401 and problem["type"] == "/problems/unauthorized", what


@pytest.fixture
async def order_id(client: httpx.AsyncClient) -> str:
    await make_product(client, total_stock=10)
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 2}, headers=bearer("U1"))
    assert r.status_code == 201, r.text
    return str(r.json()["order_id"])


async def test_the_matrix_covers_every_protected_operation(client):
    doc = (await client.get("/openapi.json")).json()
    protected = {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items() if op.get("security")}
    covered = {(m, p.replace("OID", "{order_id}").replace("P1001", "{product_id}")
                .replace(WID, "{endpoint_id}").replace("/1/", "/{delivery_id}/")
                    .replace("/7/", "/{refund_id}/"))
               for m, p, _ in protected_calls("OID")}
    assert covered == protected
    public = {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items()
              if p.startswith("/api") and not op.get("security")}
    assert public == {("GET", "/api/products"), ("GET", "/api/products/{product_id}")}


@pytest.mark.parametrize("auth", list(BAD_HS256.values()), ids=list(BAD_HS256))
async def test_every_protected_route_refuses_a_bad_token_and_writes_nothing(client, db, redis, order_id, auth):
    before = await snapshot(db, redis)
    for method, url, body in protected_calls(order_id):
        assert_unauthorized(await call(client, method, url, body, auth), f"{method} {url}")
    assert await snapshot(db, redis) == before


async def test_public_product_reads_need_no_token(client, order_id):
    assert (await client.get("/api/products")).status_code == 200
    assert (await client.get("/api/products/P1001")).status_code == 200


async def test_a_good_token_is_accepted_on_every_protected_route(client, order_id):
    # The control for the matrix above: the same calls with a valid admin token succeed.
    expected = [201, 200, 200, 200, 200, 200, 409, 200, 200, 404, 201, 200, 201, 200, 404, 404, 404, 404, 404, 200, 200]
    got = [(await call(client, m, u, b, ADMIN["Authorization"])).status_code for m, u, b in protected_calls(order_id)]
    assert got == expected


async def test_refusal_says_why_without_echoing_the_token(client, order_id):
    token = hs256(claims(exp=int(time.time()) - 60))
    r = await client.get("/api/preorder", headers={"Authorization": f"Bearer {token}"})
    assert_unauthorized(r, "expired")
    assert "expired" in r.json()["detail"].lower() and token not in r.text


# ---- RS256 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[str, str]:
    return rsa_pems()


@pytest.fixture
async def rs_client(servers, db, redis, rsa_keys) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = make_settings(*servers, jwt_algorithm="RS256", jwt_public_key=rsa_keys[1])
    async with serving(settings) as c:
        yield c, settings


async def test_rs256_service_accepts_tokens_signed_with_the_issuers_private_key(rs_client, rsa_keys):
    client, settings = rs_client
    admin = {"Authorization": "Bearer " + mint_token(settings, sub="admin-1", role="admin", key=rsa_keys[0])}
    customer = {"Authorization": "Bearer " + mint_token(settings, sub="U1", role="customer", key=rsa_keys[0])}
    r = await client.post("/api/products", json={"id": "P1001", "name": "RS", "price_amount": 100,
                                                 "total_stock": 5}, headers=admin)
    assert r.status_code == 201, r.text
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=customer)
    assert r.status_code == 201 and r.json()["user_id"] == "U1"


def bad_rs256(private: str, public: str) -> dict[str, str]:
    def rs(payload: dict[str, Any], key: str = private) -> str:
        return "Bearer " + jwt.encode(payload, key, algorithm="RS256")

    return {
        # The classic confusion: HMAC-sign with the public key, hoping the service verifies HS256 with it.
        "algorithm-confusion-hs256-with-public-key": "Bearer " + forged(claims(), alg="HS256",
                                                                        hmac_key=public.encode()),
        "hs256-with-the-configured-secret": "Bearer " + hs256(claims()),
        "signed-by-another-private-key": rs(claims(), STRANGER_PRIVATE),
        "alg-none": "Bearer " + forged(claims(), alg="none"),
        "expired": rs(claims(exp=int(time.time()) - 60)),
        "wrong-audience": rs(claims(aud="another-service")),
        "missing-exp": rs(claims(exp=DROP)),
        "missing-sub": rs(claims(sub=DROP)),
        "missing-role": rs(claims(role=DROP)),
        "missing-aud": rs(claims(aud=DROP)),
        "unknown-role": rs(claims(role="superuser")),
        "not-a-jwt": "Bearer not-a-jwt",
        "missing-header": "",
    }


async def test_rs256_service_refuses_every_bad_token_and_writes_nothing(rs_client, rsa_keys, db, redis):
    client, settings = rs_client
    admin = {"Authorization": "Bearer " + mint_token(settings, sub="admin-1", role="admin", key=rsa_keys[0])}
    r = await client.post("/api/products", json={"id": "P1001", "name": "RS", "price_amount": 100,
                                                 "total_stock": 10}, headers=admin)
    assert r.status_code == 201
    customer = {"Authorization": "Bearer " + mint_token(settings, sub="U1", role="customer", key=rsa_keys[0])}
    oid = (await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=customer)).json()
    before = await snapshot(db, redis)
    for name, auth in bad_rs256(*rsa_keys).items():
        for method, url, body in protected_calls(oid["order_id"]):
            assert_unauthorized(await call(client, method, url, body, auth or None), f"{name}: {method} {url}")
    assert await snapshot(db, redis) == before


# ---- `preorder token` ------------------------------------------------------------------------------------


def run_token_command(*args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREORDER_")}
    if secret is not None:
        env["PREORDER_JWT_SECRET"] = secret
    command = Path(sys.executable).with_name("preorder")
    return subprocess.run([str(command), "token", *args], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


async def test_preorder_token_command_prints_a_token_the_service_accepts(client):
    await make_product(client)
    done = run_token_command("--sub", "U123", "--role", "customer")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    claims_seen = jwt.decode(token, SECRET, algorithms=["HS256"], audience="preorder")
    assert (claims_seen["sub"], claims_seen["role"]) == ("U123", "customer") and claims_seen["exp"] > time.time()
    customer = {"Authorization": f"Bearer {token}"}
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=customer)
    assert r.status_code == 201 and r.json()["user_id"] == "U123"
    assert (await client.post("/api/products", json={}, headers=customer)).status_code == 403


async def test_preorder_token_command_mints_admin_tokens_too(client):
    done = run_token_command("--sub", "ops", "--role", "admin")
    assert done.returncode == 0, done.stderr
    admin = {"Authorization": f"Bearer {done.stdout.strip()}"}
    r = await client.post("/api/products", json={"id": "P7", "name": "x", "price_amount": 1, "total_stock": 1},
                          headers=admin)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(("args", "secret"), [
    pytest.param(("--sub", "U123"), None, id="no-secret"),
    pytest.param(("--sub", "U 1}"), SECRET, id="subject-not-an-id"),
    pytest.param(("--sub", "U1", "--role", "root"), SECRET, id="unknown-role"),
    pytest.param(("--sub", "U1", "--ttl", "0"), SECRET, id="zero-ttl"),
])
def test_preorder_token_command_refuses_what_the_service_would_refuse(args, secret):
    done = run_token_command(*args, secret=secret)
    assert done.returncode == 2 and not done.stdout and done.stderr
