"""Tokens from a real identity provider: keys from its JWKS document, served here by a real HTTP server on
127.0.0.1 whose keys the tests rotate. Old tokens work until their key is removed, new ones as soon as the
service may fetch again; the provider being down leaves cached keys working and unknown ones refused with 401;
a flood of unknown kids fetches at most once per interval. Issuer, audience and the role claim mapping too."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from preorder.embedded import free_port
from tests.conftest import make_settings, serving
from tests.harness import eventually

ISSUER = "https://idp.example.test/"
INTERVAL_S = 0.5


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg == "RS256" else ECAlgorithm
        return {**algorithm.to_jwk(self.private.public_key(), as_dict=True), "kid": self.kid, "alg": self.alg,
                "use": "sig"}

    def token(self, sub: str = "U1", **claims: Any) -> dict[str, str]:
        body = {"sub": sub, "aud": "preorder", "iss": ISSUER, "exp": int(time.time()) + 600, "role": "customer",
                **claims}
        body = {k: v for k, v in body.items() if v is not None}  # None: leave the claim out
        return {"Authorization": "Bearer " + jwt.encode(body, self.private, algorithm=self.alg,
                                                         headers={"kid": self.kid})}


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Provider:
    """A JWKS endpoint: publishes `keys`, counts the fetches, answers 503 while `down`."""

    keys: list[SigningKey] = field(default_factory=list)
    down: bool = False
    fetches: int = 0
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def jwks(self, _: Request) -> JSONResponse:
        self.fetches += 1
        if self.down:
            return JSONResponse({"error": "maintenance"}, status_code=503)
        return JSONResponse({"keys": [k.jwk() for k in self.keys]})


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    idp = Provider(keys=[rsa_key("A")])
    app = Starlette(routes=[Route("/.well-known/jwks.json", idp.jwks)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=idp.port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())

    async def started() -> None:
        assert server.started

    await eventually(started, within=10)
    yield idp
    server.should_exit = True
    await task


def _settings(servers: tuple[str, str], provider: Provider, **over: Any) -> Any:
    return make_settings(*servers, **{"jwt_jwks_url": provider.url, "jwt_issuer": ISSUER,
                                      "jwt_jwks_min_interval_s": INTERVAL_S, **over})


@pytest.fixture
async def client(servers, db, redis, provider) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(_settings(servers, provider)) as c:
        yield c


async def _me(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    return (await client.get("/api/preorder", headers=headers)).status_code


async def test_keys_rotate_old_tokens_work_until_their_key_is_removed(client, provider) -> None:
    old = provider.keys[0]
    assert await _me(client, old.token()) == 200
    new = ec_key("B")
    provider.keys.append(new)  # the provider publishes an ES256 key and starts signing with it

    async def new_tokens_work() -> None:
        assert await _me(client, new.token(sub=f"U{uuid.uuid4().hex[:8]}")) == 200

    started = time.monotonic()
    await eventually(new_tokens_work, within=5)
    assert time.monotonic() - started <= INTERVAL_S + 2, "accepted as soon as a fetch was allowed"
    assert await _me(client, old.token()) == 200, "the old key is still published: its tokens still work"

    provider.keys.remove(old)
    still_cached = old.token()
    assert await _me(client, still_cached) == 200

    async def old_tokens_refused() -> None:
        assert await _me(client, rsa_key("C").token()) == 401  # an unknown kid makes it look again
        r = await client.get("/api/preorder", headers=still_cached)
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", r.text

    await eventually(old_tokens_refused, within=5)
    assert await _me(client, new.token()) == 200


async def test_a_provider_outage_keeps_cached_keys_and_refuses_unknown_kids(client, provider) -> None:
    known = provider.keys[0]
    assert await _me(client, known.token()) == 200
    provider.down = True
    stranger = rsa_key("Z")
    for _ in range(3):
        r = await client.get("/api/preorder", headers=stranger.token())
        assert r.status_code == 401 and r.json()["type"] == "/problems/unauthorized", r.text
        assert await _me(client, known.token(sub=f"U{uuid.uuid4().hex[:8]}")) == 200

    async def tried_again() -> None:  # the provider is asked again after the interval, and is still down
        assert await _me(client, stranger.token()) == 401
        assert provider.fetches >= 3

    await eventually(tried_again, within=5)
    provider.down = False
    provider.keys.append(stranger)

    async def back() -> None:
        assert await _me(client, stranger.token()) == 200

    await eventually(back, within=5)


async def test_a_flood_of_unknown_kids_fetches_at_most_once_per_interval(servers, db, redis, provider) -> None:
    async with serving(_settings(servers, provider, jwt_jwks_min_interval_s=1.0)) as client:
        private = provider.keys[0].private  # a published key under made-up kids: only the kid is unknown
        tokens = [SigningKey(f"K{i}", "RS256", private).token() for i in range(200)]
        started, before = time.monotonic(), provider.fetches
        answers: list[int] = []
        while time.monotonic() - started < 2.5:
            batch = [client.get("/api/preorder", headers=tokens[(len(answers) + i) % 200]) for i in range(20)]
            answers += [r.status_code for r in await asyncio.gather(*batch)]
        elapsed = time.monotonic() - started
    assert set(answers) == {401} and len(answers) >= 40
    assert provider.fetches - before <= 1 + elapsed / 1.0, (provider.fetches - before, elapsed)


@pytest.mark.parametrize(("claims", "status"), [
    pytest.param({"iss": "https://evil.example/"}, 401, id="wrong-issuer"),
    pytest.param({"iss": None}, 401, id="no-issuer"),
    pytest.param({"aud": "another-api"}, 401, id="wrong-audience"),
    pytest.param({"role": "superuser"}, 401, id="unknown-role"),
    pytest.param({}, 200, id="good"),
])
async def test_issuer_audience_and_role_are_checked(client, provider, claims, status) -> None:
    assert await _me(client, provider.keys[0].token(**claims)) == status


async def test_the_role_comes_from_the_configured_claim(servers, db, redis, provider) -> None:
    # Keycloak's shape: realm roles under realm_access.roles, admins by a role named for this service.
    settings = _settings(servers, provider, jwt_role_claim="realm_access.roles", jwt_admin_role="preorder-admin",
                         jwt_customer_role="")
    key = provider.keys[0]
    product = {"id": "P1", "name": "x", "price_amount": 1, "total_stock": 1}
    async with serving(settings) as client:
        admin = key.token(sub="ops", role=None, realm_access={"roles": ["offline_access", "preorder-admin"]})
        customer = key.token(sub="U7", role=None, realm_access={"roles": ["offline_access"]})
        assert (await client.post("/api/products", json=product, headers=customer)).status_code == 403
        assert (await client.post("/api/products", json=product, headers=admin)).status_code == 201
    scoped = _settings(servers, provider, jwt_role_claim="scope", jwt_admin_role="preorder:admin",
                       jwt_customer_role="preorder:order")
    async with serving(scoped) as client:
        assert await _me(client, key.token(role=None, scope="openid preorder:order")) == 200
        assert await _me(client, key.token(role=None, scope="openid profile")) == 401
        r = await client.patch("/api/products/P1", json={"name": "y"},
                               headers=key.token(sub="ops", role=None, scope="preorder:admin"))
        assert r.status_code == 200
