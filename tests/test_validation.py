"""Bad input gets a clear 4xx problem+json and changes nothing."""

from __future__ import annotations

import pytest

from tests.conftest import ADMIN, bearer, make_product
from tests.invariants import assert_invariants

U1 = bearer("U1")
BAD_CREATES = [
    pytest.param({"product_id": "P1001", "quantity": 0}, 400, id="quantity-0"),
    pytest.param({"product_id": "P1001", "quantity": -1}, 400, id="negative"),
    pytest.param({"product_id": "P1001", "quantity": 10**12}, 400, id="huge"),
    pytest.param({"product_id": "P1001", "quantity": 11}, 400, id="over-configured-max"),
    pytest.param({"product_id": "P1001", "quantity": 1.5}, 400, id="fractional"),
    pytest.param({"product_id": "P1001", "quantity": "2"}, 400, id="string"),
    pytest.param({"product_id": "P1001", "quantity": None}, 400, id="null"),
    pytest.param({"product_id": "P1001", "quantity": True}, 400, id="boolean"),
    pytest.param({"product_id": "P1001"}, 400, id="missing-quantity"),
    pytest.param({"quantity": 1}, 400, id="missing-product"),
    pytest.param({"product_id": "P9999", "quantity": 1}, 404, id="unknown-product"),
    pytest.param({"product_id": "P{1}", "quantity": 1}, 400, id="product-id-with-braces"),
    pytest.param({"product_id": "P1001", "quantity": 1, "status": "paid"}, 400, id="mass-assign-status"),
    pytest.param({"product_id": "P1001", "quantity": 1, "amount_due": 1}, 400, id="mass-assign-amount"),
    pytest.param({"product_id": "P1001", "quantity": 1, "price_amount": 1}, 400, id="mass-assign-price"),
    pytest.param([1, 2], 400, id="array-body"),
]


@pytest.mark.parametrize(("body", "status"), BAD_CREATES)
async def test_bad_create_is_refused_and_changes_nothing(client, db, redis, body, status):
    await make_product(client, total_stock=10)
    r = await client.post("/api/preorder", json=body, headers=U1)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    assert (await client.get("/api/products/P1001")).json()["available"] == 10
    await assert_invariants(db, redis)


async def test_validation_errors_list_the_offending_fields(client):
    await make_product(client)
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": "x"}, headers=U1)
    assert r.status_code == 400
    assert [e["loc"] for e in r.json()["errors"]] == [["body", "quantity"]]


@pytest.mark.parametrize("raw", [b"not json", b"{", b"", b"\xff\xfe"])
async def test_non_json_body_is_400(client, db, raw):
    await make_product(client)
    r = await client.post("/api/preorder", content=raw, headers={**U1, "content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    assert await db.fetchval("SELECT count(*) FROM orders") == 0


async def test_unknown_status_is_400_and_changes_nothing(client, db):
    await make_product(client)
    order = (await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=U1)).json()
    for status in ["refunded", "PAID", "", None, 3]:
        r = await client.put(f"/api/preorder/{order['order_id']}", json={"status": status}, headers=ADMIN)
        assert r.status_code == 400, status
    assert await db.fetchval("SELECT status FROM orders") == "pending"
    assert await db.fetchval("SELECT count(*) FROM order_events") == 1


async def test_malformed_order_id_is_400_and_unknown_is_404(client):
    assert (await client.get("/api/preorder/not-a-uuid", headers=U1)).status_code == 400
    missing = await client.get("/api/preorder/0190f0e0-0000-7000-8000-000000000000", headers=U1)
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("params", [
    {"limit": 0}, {"limit": 101}, {"limit": "x"}, {"status": "weird"}, {"cursor": "!!"},
    {"created_from": "yesterday"}, {"created_from": "2026-01-02T00:00:00", "created_to": "2026-01-03T00:00:00"},
    {"created_from": "2026-01-02T00:00:00Z", "created_to": "2026-01-01T00:00:00Z"},
])
async def test_bad_list_filters_are_400(client, params):
    r = await client.get("/api/preorder", params=params, headers=U1)
    assert r.status_code == 400, (params, r.text)


async def test_oversized_body_is_413(client, db):
    await make_product(client)
    body = b'{"product_id": "P1001", "quantity": 1, "pad": "' + b"x" * 20_000 + b'"}'
    r = await client.post("/api/preorder", content=body, headers={**U1, "content-type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
