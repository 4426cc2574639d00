"""Authorization: a customer sees and changes only its own orders (another's is 404, as if it did not
exist), shipping and products are admin's (403), and no request can set what the server decides."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ADMIN, bearer, make_product
from tests.invariants import assert_invariants

ALICE, BOB = bearer("U-alice"), bearer("U-bob")


async def place(client: httpx.AsyncClient, who: dict[str, str], quantity: int = 2) -> dict[str, Any]:
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": quantity}, headers=who)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def pay(client: httpx.AsyncClient, order: dict[str, Any], who: dict[str, str]) -> httpx.Response:
    payment = {"reference": f"PAY-{order['order_id']}", "amount": order["amount_due"]}
    return await client.put(f"/api/preorder/{order['order_id']}", json={"status": "paid", "payment": payment},
                            headers=who)


async def state(db: asyncpg.Connection, client: httpx.AsyncClient) -> tuple[Any, ...]:
    orders = [tuple(r) for r in await db.fetch("SELECT id, user_id, status, payment_reference FROM orders ORDER BY id")]
    events = await db.fetchval("SELECT count(*) FROM order_events")
    refunds = await db.fetchval("SELECT count(*) FROM refunds")
    stock = (await client.get("/api/products/P1001")).json()
    return orders, events, refunds, stock["reserved"], stock["available"], stock["updated_at"]


def assert_not_found(r: httpx.Response) -> None:
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/problem+json"


@pytest.fixture
async def alices_order(client: httpx.AsyncClient) -> dict[str, Any]:
    await make_product(client, total_stock=10)
    return await place(client, ALICE)


async def test_another_customers_order_is_404_on_every_route_and_nothing_changes(client, db, redis,
                                                                                 alices_order):
    oid = alices_order["order_id"]
    before = await state(db, client)
    payment = {"reference": "PAY-bob", "amount": alices_order["amount_due"]}
    assert_not_found(await client.get(f"/api/preorder/{oid}", headers=BOB))
    assert_not_found(await client.get(f"/api/preorder/{oid}/events", headers=BOB))
    assert_not_found(await client.put(f"/api/preorder/{oid}", json={"status": "cancelled"}, headers=BOB))
    assert_not_found(await client.put(f"/api/preorder/{oid}", json={"status": "paid", "payment": payment},
                                      headers=BOB))
    assert_not_found(await client.delete(f"/api/preorder/{oid}", headers=BOB))
    assert await state(db, client) == before
    await assert_invariants(db, redis, created=[oid])


async def test_another_customers_order_answers_exactly_like_a_missing_one(client, alices_order):
    # Same status and body shape: a customer can't probe which order ids exist.
    mine = await client.get(f"/api/preorder/{alices_order['order_id']}", headers=BOB)
    missing = await client.get("/api/preorder/0190f0e0-0000-7000-8000-000000000000", headers=BOB)
    assert (mine.status_code, mine.json()["type"]) == (missing.status_code, missing.json()["type"])


async def test_listing_someone_elses_orders_is_403_and_own_listing_shows_only_own(client, alices_order):
    await place(client, BOB, quantity=1)
    r = await client.get("/api/preorder", params={"user_id": "U-alice"}, headers=BOB)
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    own = (await client.get("/api/preorder", headers=BOB)).json()["items"]
    assert [o["user_id"] for o in own] == ["U-bob"]
    explicit = (await client.get("/api/preorder", params={"user_id": "U-bob"}, headers=BOB)).json()["items"]
    assert explicit == own


async def test_customer_creating_an_order_for_another_user_is_403_and_reserves_nothing(client, db, redis,
                                                                                       alices_order):
    before = await state(db, client)
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1, "user_id": "U-alice"},
                          headers=BOB)
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    assert await state(db, client) == before
    await assert_invariants(db, redis)


@pytest.mark.parametrize("who", [pytest.param(ALICE, id="owner"), pytest.param(BOB, id="other-customer")])
async def test_customers_are_403_on_product_writes(client, db, alices_order, who):
    before = await state(db, client)
    created = await client.post("/api/products", json={"id": "P2002", "name": "x", "price_amount": 1,
                                                       "total_stock": 1}, headers=who)
    patched = await client.patch("/api/products/P1001", json={"total_stock": 1_000}, headers=who)
    assert (created.status_code, patched.status_code) == (403, 403)
    assert await db.fetchval("SELECT count(*) FROM products") == 1
    assert await state(db, client) == before


async def test_only_an_admin_ships_even_the_customers_own_paid_order(client, db, redis, alices_order):
    oid = alices_order["order_id"]
    assert (await pay(client, alices_order, ALICE)).status_code == 200
    before = await state(db, client)
    r = await client.put(f"/api/preorder/{oid}", json={"status": "shipped"}, headers=ALICE)
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    assert await state(db, client) == before
    shipped = await client.put(f"/api/preorder/{oid}", json={"status": "shipped"}, headers=ADMIN)
    assert shipped.status_code == 200 and shipped.json()["status"] == "shipped"
    await assert_invariants(db, redis, created=[oid])


async def test_a_customer_asking_to_ship_a_pending_order_is_403_not_409(client, db, alices_order):
    before = await state(db, client)
    r = await client.put(f"/api/preorder/{alices_order['order_id']}", json={"status": "shipped"}, headers=ALICE)
    assert r.status_code == 403, "shipping is admin's whatever the order's status"
    assert await state(db, client) == before


async def test_admin_can_act_on_anyones_order(client, db, redis, alices_order):
    oid = alices_order["order_id"]
    assert (await client.get(f"/api/preorder/{oid}", headers=ADMIN)).json()["user_id"] == "U-alice"
    listed = (await client.get("/api/preorder", params={"user_id": "U-alice"}, headers=ADMIN)).json()["items"]
    assert [o["order_id"] for o in listed] == [oid]
    assert (await pay(client, alices_order, ADMIN)).json()["status"] == "paid"
    cancelled = await client.delete(f"/api/preorder/{oid}", headers=ADMIN)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    events = (await client.get(f"/api/preorder/{oid}/events", headers=ADMIN)).json()["items"]
    assert [(e["to_status"], e["actor"]) for e in events] == [
        ("pending", "U-alice"), ("pending", "admin-1"), ("paid", "admin-1"), ("cancelled", "admin-1"),
        ("cancelled", "admin-1")]  # the payment, the status change, the cancel, its refund
    for_alice = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1,
                                                         "user_id": "U-alice"}, headers=ADMIN)
    assert for_alice.status_code == 201 and for_alice.json()["user_id"] == "U-alice"
    await assert_invariants(db, redis, created=[oid, for_alice.json()["order_id"]])


# ---- mass assignment: the server decides ids, status, prices, amounts, timestamps, ownership ------------
# (test_validation.py covers status / amount_due / price_amount on create; these are the rest.)

SMUGGLED_CREATES = [
    pytest.param({"order_id": "0190f0e0-0000-7000-8000-000000000000"}, id="order-id"),
    pytest.param({"amount_paid": 1}, id="amount-paid"),
    pytest.param({"currency": "JPY"}, id="currency"),
    pytest.param({"payment_reference": "PAY-1"}, id="payment-reference"),
    pytest.param({"created_at": "2020-01-01T00:00:00Z"}, id="created-at"),
    pytest.param({"pay_by": "2099-01-01T00:00:00Z"}, id="pay-by"),
    pytest.param({"role": "admin"}, id="role"),
    pytest.param({"payment": {"reference": "PAY-1", "amount": 5998, "status": "captured"}}, id="payment-status"),
]


@pytest.mark.parametrize("extra", SMUGGLED_CREATES)
async def test_create_carrying_server_fields_is_400_and_writes_nothing(client, db, redis, extra):
    await make_product(client, total_stock=10)
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 2, **extra}, headers=ALICE)
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", r.text
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    assert (await client.get("/api/products/P1001")).json()["available"] == 10
    await assert_invariants(db, redis)


SMUGGLED_CHANGES = [
    pytest.param({"status": "cancelled", "user_id": "U-bob"}, id="ownership"),
    pytest.param({"status": "cancelled", "amount_due": 0}, id="amount-due"),
    pytest.param({"status": "cancelled", "quantity": 1}, id="quantity"),
    pytest.param({"status": "paid", "payment": {"reference": "R1", "amount": 5998}, "amount_paid": 5998},
                 id="amount-paid"),
    pytest.param({"status": "cancelled", "actor": "system"}, id="event-actor"),
]


@pytest.mark.parametrize("body", SMUGGLED_CHANGES)
async def test_status_change_carrying_other_fields_is_400_and_changes_nothing(client, db, alices_order, body):
    before = await state(db, client)
    r = await client.put(f"/api/preorder/{alices_order['order_id']}", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert await state(db, client) == before


@pytest.mark.parametrize("extra", [
    pytest.param({"reserved": 0}, id="reserved"),
    pytest.param({"available": 10**6}, id="available"),
    pytest.param({"stock_epoch": 0}, id="stock-epoch"),
    pytest.param({"id": "P9"}, id="rename"),
    pytest.param({"created_at": "2020-01-01T00:00:00Z"}, id="created-at"),
    pytest.param({"totalStock": 1}, id="misspelt"),
])
async def test_product_patch_with_unknown_fields_is_400_and_changes_nothing(client, db, alices_order, extra):
    before = await state(db, client)
    r = await client.patch("/api/products/P1001", json={"name": "renamed", **extra}, headers=ADMIN)
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", r.text
    assert await state(db, client) == before
    assert await db.fetchval("SELECT name FROM products") == "Product P1001"


@pytest.mark.parametrize("extra", [{"reserved": 5}, {"stock_epoch": 9}, {"created_at": "2020-01-01T00:00:00Z"}])
async def test_product_create_with_server_fields_is_400(client, db, extra):
    body = {"id": "P1", "name": "x", "price_amount": 1, "total_stock": 1, **extra}
    assert (await client.post("/api/products", json=body, headers=ADMIN)).status_code == 400
    assert await db.fetchval("SELECT count(*) FROM products") == 0


async def test_unknown_list_filters_are_400_not_silently_ignored(client, alices_order):
    # A misspelt filter must not quietly widen an admin's listing to everyone's orders.
    r = await client.get("/api/preorder", params={"userid": "U-alice"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["errors"][0]["loc"] == ["query", "userid"]
    assert (await client.get("/api/products", params={"page": 2})).status_code == 400
