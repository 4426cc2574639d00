"""Abuse limits: order creation is rate limited per customer and per client address (429 + Retry-After,
nothing reserved), and every input is bounded: sizes, lengths, numbers, characters, dates (400 or 413)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN, bearer, make_product, make_settings, serving
from tests.invariants import assert_invariants

U1 = bearer("U1")
ORDER = {"product_id": "P1001", "quantity": 1}
ClientFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def custom_client(servers, db, redis) -> ClientFactory:
    """A client on an app built with the given setting overrides (fresh PostgreSQL and Redis per test)."""

    @asynccontextmanager
    async def build(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        async with serving(make_settings(*servers, **overrides)) as client:
            yield client

    return build


async def burst(client: httpx.AsyncClient, who: list[dict[str, str]]) -> list[httpx.Response]:
    return list(await asyncio.gather(*(client.post("/api/preorder", json=ORDER, headers=h) for h in who)))


def assert_rate_limited(r: httpx.Response, window_s: int) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/problem+json"
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= window_s
    assert r.json()["type"] == "/problems/rate-limited" and r.json()["retry_after"] == retry_after


async def test_a_burst_over_the_per_customer_limit_gets_429s_and_reserves_only_what_succeeded(
        custom_client, db, redis):
    async with custom_client(rate_limit_per_user=5, rate_limit_window_s=60) as client:
        await make_product(client, total_stock=100)
        answers = await burst(client, [U1] * 12)
        created = [r.json()["order_id"] for r in answers if r.status_code == 201]
        assert len(created) == 5, [r.status_code for r in answers]
        for r in answers:
            if r.status_code != 201:
                assert_rate_limited(r, 60)
        assert await db.fetchval("SELECT count(*) FROM orders") == 5
        assert (await client.get("/api/products/P1001")).json()["available"] == 95
        await assert_invariants(db, redis, created=created)


async def test_one_customer_being_limited_does_not_limit_another(custom_client, db, redis):
    async with custom_client(rate_limit_per_user=2, rate_limit_window_s=60) as client:
        await make_product(client)
        first = await burst(client, [U1] * 3)
        assert sorted(r.status_code for r in first) == [201, 201, 429]
        other = await burst(client, [bearer("U2")] * 2)
        assert [r.status_code for r in other] == [201, 201]
        await assert_invariants(db, redis, created=[r.json()["order_id"] for r in first + other
                                                    if r.status_code == 201])


async def test_many_customers_from_one_address_hit_the_per_address_limit(custom_client, db, redis):
    # The ASGI transport gives every request the same client address, like many users behind one host.
    async with custom_client(rate_limit_per_user=100, rate_limit_per_client=6, rate_limit_window_s=60) as client:
        await make_product(client, total_stock=100)
        users = [bearer(f"U{i}") for i in range(4) for _ in range(3)]
        answers = await burst(client, users)
        created = [r.json()["order_id"] for r in answers if r.status_code == 201]
        assert len(created) == 6, [r.status_code for r in answers]
        for r in answers:
            if r.status_code != 201:
                assert_rate_limited(r, 60)
        assert (await client.get("/api/products/P1001")).json()["available"] == 94
        await assert_invariants(db, redis, created=created)


async def test_reads_are_not_counted_against_the_order_limit(custom_client):
    async with custom_client(rate_limit_per_user=1, rate_limit_window_s=60) as client:
        await make_product(client)
        for _ in range(5):
            assert (await client.get("/api/preorder", headers=U1)).status_code == 200
        assert (await client.post("/api/preorder", json=ORDER, headers=U1)).status_code == 201


# ---- bounded input ------------------------------------------------------------------------------------


async def test_quantity_is_capped_by_the_configured_maximum_and_the_document_says_so(custom_client, db):
    async with custom_client(max_quantity=3) as client:
        await make_product(client)
        over = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 4}, headers=U1)
        assert over.status_code == 400 and "3" in over.json()["detail"]
        assert await db.fetchval("SELECT count(*) FROM orders") == 0
        at_cap = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 3}, headers=U1)
        assert at_cap.status_code == 201
        doc = (await client.get("/openapi.json")).json()
        assert doc["components"]["schemas"]["OrderCreate"]["properties"]["quantity"]["maximum"] == 3


@pytest.mark.parametrize("path", ["/api/products", "/api/preorder"])
async def test_page_size_over_the_cap_is_400_and_the_cap_itself_is_fine(client, path):
    await make_product(client)
    assert (await client.get(path, params={"limit": 101}, headers=ADMIN)).status_code == 400
    assert (await client.get(path, params={"limit": 10**30}, headers=ADMIN)).status_code == 400
    assert (await client.get(path, params={"limit": 100}, headers=ADMIN)).status_code == 200


LONG_ID = "P" * 65


@pytest.mark.parametrize(("method", "url", "body", "params"), [
    pytest.param("POST", "/api/preorder", {"product_id": LONG_ID, "quantity": 1}, None, id="body-product-id"),
    pytest.param("POST", "/api/preorder", {"product_id": "P1001", "quantity": 1, "user_id": "U" * 65}, None,
                 id="body-user-id"),
    pytest.param("GET", f"/api/products/{LONG_ID}", None, None, id="path-product-id"),
    pytest.param("PATCH", f"/api/products/{LONG_ID}", {"name": "x"}, None, id="patch-path-product-id"),
    pytest.param("GET", "/api/preorder/" + "0" * 200, None, None, id="path-order-id"),
    pytest.param("GET", "/api/preorder", None, {"user_id": "U" * 65}, id="filter-user-id"),
    pytest.param("GET", "/api/preorder", None, {"product_id": LONG_ID}, id="filter-product-id"),
    pytest.param("GET", "/api/preorder", None, {"cursor": "c" * 65}, id="order-cursor"),
    pytest.param("GET", "/api/products", None, {"cursor": LONG_ID}, id="product-cursor"),
    pytest.param("POST", "/api/products", {"id": LONG_ID, "name": "x", "price_amount": 1, "total_stock": 1}, None,
                 id="new-product-id"),
    pytest.param("POST", "/api/products", {"id": "P2", "name": "n" * 201, "price_amount": 1, "total_stock": 1},
                 None, id="product-name"),
])
async def test_over_long_strings_are_400(client, db, method, url, body, params):
    await make_product(client)
    r = await client.request(method, url, json=body, params=params, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    assert await db.fetchval("SELECT count(*) FROM products") == 1


@pytest.fixture
async def pending(client: httpx.AsyncClient) -> dict[str, Any]:
    await make_product(client)
    return dict((await client.post("/api/preorder", json=ORDER, headers=U1)).json())


@pytest.mark.parametrize(("length", "status"), [(200, 200), (201, 400)])
async def test_cancel_reason_is_bounded_at_200_characters(client, db, pending, length, status):
    r = await client.put(f"/api/preorder/{pending['order_id']}", json={"status": "cancelled", "reason": "r" * length},
                         headers=U1)
    assert r.status_code == status, r.text
    assert await db.fetchval("SELECT count(*) FROM order_events") == (2 if status == 200 else 1)


@pytest.mark.parametrize(("length", "status"), [(128, 200), (129, 400)])
async def test_payment_reference_is_bounded_at_128_characters(client, db, pending, length, status):
    payment = {"reference": "R" * length, "amount": pending["amount_due"]}
    r = await client.put(f"/api/preorder/{pending['order_id']}", json={"status": "paid", "payment": payment},
                         headers=U1)
    assert r.status_code == status, r.text


@pytest.mark.parametrize(("key", "status"), [("k" * 128, 201), ("k" * 129, 400), ("two words", 400), ("é", 400)])
async def test_idempotency_key_is_bounded_printable_ascii(client, db, key, status):
    await make_product(client)
    r = await client.post("/api/preorder", json=ORDER, headers={**U1, "Idempotency-Key": key.encode()})
    assert r.status_code == status, r.text
    assert await db.fetchval("SELECT count(*) FROM orders") == (1 if status == 201 else 0)


@pytest.mark.parametrize(("field", "value"), [
    pytest.param("quantity", 10**30, id="quantity-10e30"),
    pytest.param("quantity", 1e308, id="quantity-huge-float"),
    pytest.param("quantity", -(10**30), id="quantity-negative-huge"),
])
async def test_huge_numbers_are_400(client, db, field, value):
    await make_product(client)
    r = await client.post("/api/preorder", json={**ORDER, field: value}, headers=U1)
    assert r.status_code == 400, r.text
    assert await db.fetchval("SELECT count(*) FROM orders") == 0


@pytest.mark.parametrize("body", [
    pytest.param({"total_stock": 10**20}, id="stock"),
    pytest.param({"price_amount": 10**13}, id="price"),
    pytest.param({"per_user_limit": 10**7}, id="per-user-limit"),
    pytest.param({"payment_window_seconds": 10**9}, id="payment-window"),
])
async def test_huge_product_numbers_are_400(client, db, body):
    await make_product(client)
    before = await db.fetchrow("SELECT * FROM products")
    assert (await client.patch("/api/products/P1001", json=body, headers=ADMIN)).status_code == 400
    assert await db.fetchrow("SELECT * FROM products") == before


# ---- request body size --------------------------------------------------------------------------------


async def test_oversized_streamed_body_without_content_length_is_413(client, db):
    await make_product(client)

    async def chunks() -> AsyncIterator[bytes]:  # chunked transfer: the size is only known by counting
        yield b'{"product_id": "P1001", "quantity": 1, "pad": "'
        for _ in range(10):
            yield b"x" * 4_000
        yield b'"}'

    r = await client.post("/api/preorder", content=chunks(), headers={**U1, "content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/payload-too-large"
    assert await db.fetchval("SELECT count(*) FROM orders") == 0


@pytest.mark.parametrize(("method", "url", "headers"), [
    pytest.param("POST", "/api/preorder", {}, id="before-authentication"),
    pytest.param("PATCH", "/api/products/P1001", ADMIN, id="product-patch"),
    pytest.param("PUT", "/api/preorder/0190f0e0-0000-7000-8000-000000000000", U1, id="status-change"),
])
async def test_announced_oversized_body_is_413_before_any_work(client, db, method, url, headers):
    await make_product(client)
    before = await db.fetchrow("SELECT * FROM products")
    body = b'{"name": "' + b"n" * 17_000 + b'"}'
    r = await client.request(method, url, content=body, headers={**headers, "content-type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert await db.fetchrow("SELECT * FROM products") == before


async def test_a_body_just_under_the_limit_is_parsed_normally(client):
    await make_product(client)
    body = b'{"product_id": "P1001", "quantity": 1, "pad": "' + b"x" * 16_000 + b'"}'
    r = await client.post("/api/preorder", content=body, headers={**U1, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["errors"][0]["loc"] == ["body", "pad"]  # refused for the field
