"""The seed's contract: create, read, the status machine, events, cancel."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ADMIN, bearer, make_product
from tests.invariants import assert_invariants

U123 = bearer("U123")
SEED = {"product_id": "P1001", "quantity": 2, "user_id": "U123"}


async def pay(client: httpx.AsyncClient, order: dict, headers: dict, **over: object) -> httpx.Response:
    payment = {"reference": f"PAY-{order['order_id']}", "amount": order["amount_due"], **over}
    return await client.put(f"/api/preorder/{order['order_id']}", json={"status": "paid", "payment": payment},
                            headers=headers)


async def test_seed_example_creates_a_pending_order(client, db, redis):
    await make_product(client)
    r = await client.post("/api/preorder", json=SEED, headers=U123)
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["status"] == "pending" and order["quantity"] == 2 and order["user_id"] == "U123"
    assert order["amount_due"] == 2 * 2999
    assert r.headers["location"] == f"/api/preorder/{order['order_id']}"
    got = await client.get(f"/api/preorder/{order['order_id']}", headers=U123)
    assert got.status_code == 200 and got.json() == order
    product = (await client.get("/api/products/P1001")).json()
    assert (product["total_stock"], product["reserved"], product["available"]) == (100, 2, 98)
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_user_id_defaults_to_the_token_subject(client):
    await make_product(client)
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=U123)
    assert r.status_code == 201 and r.json()["user_id"] == "U123"


async def test_whole_lifecycle_to_completed_with_one_event_per_change(client, db, redis):
    await make_product(client)
    order = (await client.post("/api/preorder", json=SEED, headers=U123)).json()
    oid = order["order_id"]
    assert (await pay(client, order, U123)).json()["status"] == "paid"
    r = await client.put(f"/api/preorder/{oid}", json={"status": "shipped"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "shipped"
    r = await client.put(f"/api/preorder/{oid}", json={"status": "completed"}, headers=U123)
    assert r.status_code == 200 and r.json()["status"] == "completed"
    events = (await client.get(f"/api/preorder/{oid}/events", headers=U123)).json()["items"]
    assert [(e["type"], e["from_status"], e["to_status"]) for e in events] == [
        ("created", None, "pending"), ("payment_recorded", "pending", "pending"), ("paid", "pending", "paid"),
        ("shipped", "paid", "shipped"), ("completed", "shipped", "completed")]
    assert [e["actor"] for e in events] == ["U123", "U123", "U123", "admin-1", "U123"]
    assert all(e["reason"] and e["at"] for e in events)
    product = (await client.get("/api/products/P1001")).json()
    assert product["reserved"] == 2, "shipped and completed stock stays sold"
    await assert_invariants(db, redis, created=[oid])


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ([], ["shipped", "completed"]),
        (["paid"], ["completed", "paid"]),
        (["paid", "shipped"], ["paid", "cancelled", "shipped"]),
        (["paid", "shipped", "completed"], ["paid", "shipped", "cancelled", "completed"]),
        (["cancelled"], ["paid", "shipped", "completed"]),
    ],
)
async def test_refused_transitions_answer_409_and_change_nothing(client, db, redis, path, refused):
    await make_product(client)
    order = (await client.post("/api/preorder", json=SEED, headers=U123)).json()
    oid = order["order_id"]
    for step in path:
        r = await (pay(client, order, U123) if step == "paid" else
                   client.put(f"/api/preorder/{oid}", json={"status": step}, headers=ADMIN))
        assert r.status_code == 200, r.text
    before = await client.get(f"/api/preorder/{oid}/events", headers=ADMIN)
    stock_before = (await client.get("/api/products/P1001")).json()
    for target in refused:
        body = {"status": target}
        if target == "paid":
            body["payment"] = {"reference": "PAY-again", "amount": order["amount_due"]}
        r = await client.put(f"/api/preorder/{oid}", json=body, headers=ADMIN)
        assert r.status_code == 409, (target, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert (await client.get(f"/api/preorder/{oid}/events", headers=ADMIN)).json() == before.json()
    assert (await client.get("/api/products/P1001")).json() == stock_before
    await assert_invariants(db, redis)


async def test_cancel_gives_stock_back_once(client, db, redis):
    await make_product(client, total_stock=10)
    order = (await client.post("/api/preorder", json=SEED, headers=U123)).json()
    assert (await client.get("/api/products/P1001")).json()["available"] == 8
    first = await client.delete(f"/api/preorder/{order['order_id']}", headers=U123)
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    assert (await client.get("/api/products/P1001")).json()["available"] == 10
    second = await client.delete(f"/api/preorder/{order['order_id']}", headers=U123)
    assert second.status_code == 200 and second.json() == first.json()
    assert (await client.get("/api/products/P1001")).json()["available"] == 10
    events = (await client.get(f"/api/preorder/{order['order_id']}/events", headers=U123)).json()["items"]
    assert [e["to_status"] for e in events] == ["pending", "cancelled"]
    await assert_invariants(db, redis)


async def test_cancelling_a_paid_order_writes_a_refund(client, db, redis):
    await make_product(client)
    order = (await client.post("/api/preorder", json=SEED, headers=U123)).json()
    assert (await pay(client, order, U123)).status_code == 200
    r = await client.delete(f"/api/preorder/{order['order_id']}", headers=U123)
    assert r.json()["status"] == "cancelled"
    refund = await db.fetchrow("SELECT amount, currency, payment_reference FROM refunds")
    assert refund["amount"] == order["amount_due"] and refund["payment_reference"] == f"PAY-{order['order_id']}"
    await assert_invariants(db, redis)


async def test_shipped_order_cannot_be_deleted(client, db, redis):
    await make_product(client)
    order = (await client.post("/api/preorder", json=SEED, headers=U123)).json()
    await pay(client, order, U123)
    await client.put(f"/api/preorder/{order['order_id']}", json={"status": "shipped"}, headers=ADMIN)
    r = await client.delete(f"/api/preorder/{order['order_id']}", headers=U123)
    assert r.status_code == 409
    assert (await client.get("/api/products/P1001")).json()["reserved"] == 2


async def test_list_filters_and_paginates_newest_first(client):
    await make_product(client)
    await make_product(client, "P2002")
    made = []
    for i in range(5):
        pid = "P1001" if i % 2 == 0 else "P2002"
        made.append((await client.post("/api/preorder", json={"product_id": pid, "quantity": 1},
                                       headers=U123)).json())
    await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=bearer("U999"))
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/preorder", params=params, headers=U123)).json()
        seen += [o["order_id"] for o in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [o["order_id"] for o in reversed(made)]
    only = (await client.get("/api/preorder", params={"product_id": "P2002"}, headers=U123)).json()["items"]
    assert [o["order_id"] for o in only] == [made[3]["order_id"], made[1]["order_id"]]
    everyone = (await client.get("/api/preorder", params={"status": "pending"}, headers=ADMIN)).json()["items"]
    assert len(everyone) == 6
    start = made[2]["created_at"]
    ranged = (await client.get("/api/preorder", params={"created_from": start}, headers=U123)).json()["items"]
    assert [o["order_id"] for o in ranged] == [o["order_id"] for o in reversed(made[2:])]
