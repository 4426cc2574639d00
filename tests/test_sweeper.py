"""Payment against the payment-timeout sweeper: over many orders, with several sweepers racing the payments and
the customers' own cancels, every order ends paid or cancelled exactly once and its stock comes back at most once."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from preorder import db as dbmod
from preorder.orders.service import Orders
from preorder.stock.service import Stock
from tests.conftest import bearer, make_product
from tests.invariants import assert_invariants

N_ORDERS = 200
SWEEPERS = 4
USERS = [bearer(f"U-s{i}") for i in range(20)]


@pytest.fixture
async def sweepers(app) -> AsyncIterator[list[Orders]]:
    """Independent sweepers, each with its own pool, as if each ran in its own app process."""
    settings = app.state.settings
    pools = [await dbmod.create_pool(settings) for _ in range(SWEEPERS)]
    try:
        yield [Orders(pool=p, redis=app.state.redis, stock=Stock(app.state.redis, p), settings=settings)
               for p in pools]
    finally:
        for p in pools:
            await p.close()


async def _create_all(client: httpx.AsyncClient) -> list[dict]:
    async def one(i: int) -> dict:
        r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1 + i % 2},
                              headers=USERS[i % len(USERS)])
        assert r.status_code == 201, r.text
        return dict(r.json(), headers=USERS[i % len(USERS)])

    return list(await asyncio.gather(*(one(i) for i in range(N_ORDERS))))


async def _pay(client: httpx.AsyncClient, order: dict, delay: float) -> tuple[str, int]:
    await asyncio.sleep(delay)  # spreads the payments across the deadline (load shape, not synchronisation)
    payment = {"reference": f"PAY-{order['order_id']}", "amount": order["amount_due"]}
    r = await client.put(f"/api/preorder/{order['order_id']}", json={"status": "paid", "payment": payment},
                         headers=order["headers"])
    assert r.status_code in (200, 409), r.text
    return order["order_id"], r.status_code


async def _cancel(client: httpx.AsyncClient, order: dict, delay: float) -> tuple[str, int]:
    await asyncio.sleep(delay)
    r = await client.delete(f"/api/preorder/{order['order_id']}", headers=order["headers"])
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    return order["order_id"], r.status_code


async def _sweep_until_nothing_pending(orders: Orders, db_pool: asyncpg.Pool) -> int:
    expired = 0
    while await db_pool.fetchval("SELECT count(*) FROM orders WHERE status = 'pending'"):
        n = await orders.expire_due(limit=10)
        expired += n
        if n == 0:
            await asyncio.sleep(0.005)  # nothing due yet: poll again
    return expired


@pytest.mark.parametrize("deadline", ["pay_by pushed by SQL", "1-second payment window"])
async def test_payments_cancels_and_sweepers_race_each_order_settles_once(client, db, redis, sweepers, deadline):
    window = 1 if deadline == "1-second payment window" else 900
    spread = 2.0 if window == 1 else 0.8  # the payments straddle the deadline, a second or 400 ms away
    await make_product(client, total_stock=N_ORDERS * 2, payment_window_seconds=window)
    made = await _create_all(client)
    if window == 900:
        await db.execute("UPDATE orders SET pay_by = now() + interval '400 milliseconds'")
    rng = random.Random(3)
    actions = [(_cancel if i % 3 == 0 else _pay)(client, o, rng.uniform(0, spread)) for i, o in enumerate(made)]
    answers = dict(await asyncio.gather(*actions))
    swept = await asyncio.gather(*(_sweep_until_nothing_pending(s, s.pool) for s in sweepers))

    final = {str(r["id"]): r["status"] for r in await db.fetch("SELECT id, status FROM orders")}
    assert Counter(final.values()).keys() <= {"paid", "cancelled"}
    for i, o in enumerate(made):
        oid = o["order_id"]
        if i % 3 != 0:
            assert (answers[oid] == 200) == (final[oid] == "paid"), "a 200 payment means paid, a 409 means expired"
    paid = sum(1 for s in final.values() if s == "paid")
    payers = sum(1 for i in range(len(made)) if i % 3 != 0)
    assert 0 < paid < payers, "the deadline fell in the middle of the payments: both won"
    by_sweeper = await db.fetchval(
        "SELECT count(*) FROM order_events WHERE reason = 'payment_timeout' AND to_status = 'cancelled'")
    assert sum(swept) == by_sweeper, "each expiry was counted by exactly one sweeper"
    assert by_sweeper > 0
    paid_qty = await db.fetchval("SELECT COALESCE(sum(quantity), 0) FROM orders WHERE status = 'paid'")
    assert int(await redis.hget("po:{P1001}:stock", "reserved")) == paid_qty, "every cancelled order released once"
    await assert_invariants(db, redis, created=[o["order_id"] for o in made])


async def test_sweeper_leaves_paid_and_not_yet_due_orders_alone(client, db, redis, app):
    await make_product(client, total_stock=10)
    me = USERS[0]
    due, paid, young = [
        (await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=me)).json()
        for _ in range(3)
    ]
    r = await client.put(f"/api/preorder/{paid['order_id']}", headers=me, json={
        "status": "paid", "payment": {"reference": "PAY-x", "amount": paid["amount_due"]}})
    assert r.status_code == 200
    await db.execute("UPDATE orders SET pay_by = now() - interval '1 second' WHERE id = ANY($1::uuid[])",
                     [uuid.UUID(due["order_id"]), uuid.UUID(paid["order_id"])])
    assert await app.state.orders.expire_due() == 1
    assert await app.state.orders.expire_due() == 0, "a second sweep finds nothing"
    statuses = dict(await db.fetch("SELECT id::text, status FROM orders"))
    assert statuses == {due["order_id"]: "cancelled", paid["order_id"]: "paid", young["order_id"]: "pending"}
    assert (await client.get("/api/products/P1001")).json()["reserved"] == 2
    await assert_invariants(db, redis)


async def test_cancel_that_loses_the_race_to_the_sweeper_answers_the_cancelled_order(client, db, redis, app):
    """DELETE read the order while pending; the sweeper cancelled it before the DELETE's own update."""
    await make_product(client, total_stock=10)
    me = USERS[0]
    order = (await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 2}, headers=me)).json()
    orders: Orders = app.state.orders
    principal = app.state.verifier.verify(me["Authorization"].removeprefix("Bearer "))
    seen_pending = await orders.get(principal, uuid.UUID(order["order_id"]))
    await db.execute("UPDATE orders SET pay_by = now() - interval '1 second'")
    assert await orders.expire_due() == 1
    answer = await orders.cancel(principal, seen_pending, None)
    assert answer.status == "cancelled"
    assert (await client.get("/api/products/P1001")).json()["reserved"] == 0, "released once, by the sweeper"
    await assert_invariants(db, redis)


async def test_a_payment_deadline_passing_on_thousands_of_orders_expires_them_all_in_one_round(client, db, redis, app):
    """The sweeper's round (workers/loops.py) takes batch after batch until nothing is due: 2,500 orders past
    their window are cancelled in one round of three statements, every unit goes back to the stock and every
    customer's unpaid count to zero."""
    n, customers = 2_500, 50
    await make_product(client, total_stock=n * 2)
    made = await _create_many(client, n, customers)
    await db.execute("UPDATE orders SET pay_by = now() - interval '1 second'")
    units = sum(o["quantity"] for o in made)
    assert (await client.get("/api/products/P1001")).json()["reserved"] == units

    orders: Orders = app.state.orders
    assert await orders.stock.customers.unpaid("U-bulk0") > 0
    assert await orders.expire_all_due(batch=1000) == n, "one round expired every due order"
    assert await orders.expire_all_due(batch=1000) == 0

    assert await db.fetchval("SELECT count(*) FROM orders WHERE status = 'cancelled'") == n
    assert (await client.get("/api/products/P1001")).json()["reserved"] == 0
    for c in range(customers):
        assert await orders.stock.customers.unpaid(f"U-bulk{c}") == 0, f"customer {c}'s unpaid units given back"
    await assert_invariants(db, redis, created=[o["order_id"] for o in made])


async def _create_many(client: httpx.AsyncClient, n: int, customers: int) -> list[dict]:
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> dict:
        async with gate:
            r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1 + i % 2},
                                  headers=bearer(f"U-bulk{i % customers}"))
        assert r.status_code == 201, r.text
        return dict(r.json())

    return list(await asyncio.gather(*(one(i) for i in range(n))))
