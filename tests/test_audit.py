"""Admin actions are audited: product create and change (before/after), ship, admin cancel (the refund decision
of a paid order): who, what, when, from where, in an append-only table, read through GET /api/audit (admin)
with cursor paging. A customer's own actions are not admin actions and are not in it."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests.conftest import ADMIN, bearer, make_product

U1 = bearer("U1")


@pytest.fixture
def pid() -> str:
    """A product id of this test alone: the audit log is never emptied between tests."""
    return f"A{uuid.uuid4().hex[:12]}"


async def _entries(client, target: str, limit: int = 100) -> list[dict]:
    r = await client.get("/api/audit", params={"target": target, "limit": limit}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def _paid_order(client, pid: str) -> dict:
    order = (await client.post("/api/preorder", json={"product_id": pid, "quantity": 1}, headers=U1)).json()
    pay = {"status": "paid", "payment": {"reference": f"R-{order['order_id']}", "amount": order["amount_due"]}}
    assert (await client.put(f"/api/preorder/{order['order_id']}", json=pay, headers=U1)).status_code == 200
    return dict(order)


async def test_product_create_and_change_are_audited_with_before_and_after(client, db, pid) -> None:
    await make_product(client, pid, total_stock=100)
    assert (await client.patch(f"/api/products/{pid}", json={"total_stock": 150}, headers=ADMIN)).status_code == 200
    update, create = await _entries(client, pid)
    assert (create["action"], create["actor"], create["client"]) == ("product.create", "admin-1", "127.0.0.1")
    assert create["before"] is None and create["after"]["total_stock"] == 100
    assert update["action"] == "product.update"
    assert (update["before"]["total_stock"], update["after"]["total_stock"]) == (100, 150)
    assert update["at"] >= create["at"]


async def test_ship_and_admin_cancel_are_audited_and_customer_actions_are_not(client, db, pid) -> None:
    await make_product(client, pid, total_stock=10)
    shipped, refunded = await _paid_order(client, pid), await _paid_order(client, pid)
    mine = (await client.post("/api/preorder", json={"product_id": pid, "quantity": 1}, headers=U1)).json()
    assert (await client.delete(f"/api/preorder/{mine['order_id']}", headers=U1)).status_code == 200
    assert (await client.put(f"/api/preorder/{shipped['order_id']}", json={"status": "shipped"},
                             headers=ADMIN)).status_code == 200
    assert (await client.delete(f"/api/preorder/{refunded['order_id']}", headers=ADMIN)).status_code == 200

    (ship,) = await _entries(client, shipped["order_id"])
    assert (ship["action"], ship["before"], ship["after"]["status"]) == ("order.shipped", {"status": "paid"},
                                                                         "shipped")
    (cancel,) = await _entries(client, refunded["order_id"])
    assert cancel["action"] == "order.cancelled" and cancel["after"]["refunded"] > 0
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1::uuid", refunded["order_id"]) == 1
    assert await _entries(client, mine["order_id"]) == [], "the customer's own cancel is not an admin action"
    assert await _entries(client, shipped["order_id"].replace("-", "")[:8]) == []


async def test_the_audit_log_pages_newest_first_with_a_cursor(client, db, pid) -> None:
    await make_product(client, pid, total_stock=100)
    for stock in range(101, 108):
        assert (await client.patch(f"/api/products/{pid}", json={"total_stock": stock}, headers=ADMIN)).is_success
    seen, cursor = [], None
    while True:
        params = {"target": pid, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/audit", params=params, headers=ADMIN)).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [e["id"] for e in seen] == sorted((e["id"] for e in seen), reverse=True)
    assert len(seen) == 8 and seen[-1]["action"] == "product.create"
    assert [e["after"]["total_stock"] for e in seen[:7]] == list(range(107, 100, -1))
    assert (await client.get("/api/audit", params={"cursor": "x"}, headers=ADMIN)).status_code == 400


async def test_only_admins_read_the_audit_log(client) -> None:
    assert (await client.get("/api/audit", headers=U1)).status_code == 403
    r = await client.get("/api/audit")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("statement", ["UPDATE audit_log SET actor = 'someone-else'", "DELETE FROM audit_log",
                                       "TRUNCATE audit_log"])
async def test_the_audit_table_refuses_rewrites(client, db, pid, statement) -> None:
    await make_product(client, pid)
    before = await db.fetch("SELECT * FROM audit_log ORDER BY id")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute(statement)
    assert await db.fetch("SELECT * FROM audit_log ORDER BY id") == before
