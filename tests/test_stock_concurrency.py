"""Never oversold under concurrency: the reserve script is the only gate, and it is exact."""

from __future__ import annotations

import asyncio
import random

from tests.conftest import bearer, command_calls, make_product, make_settings, reset_command_stats, serving
from tests.invariants import assert_invariants

TOKENS = [bearer(f"U{i:04d}") for i in range(500)]


async def test_500_concurrent_creates_for_100_units_sell_exactly_100(client, db, redis):
    await make_product(client, total_stock=100)

    async def order(i: int):
        return await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=TOKENS[i])

    answers = await asyncio.gather(*(order(i) for i in range(500)))
    codes = [r.status_code for r in answers]
    assert codes.count(201) == 100 and codes.count(409) == 400, {r.text for r in answers if r.status_code == 503}
    assert all(r.json()["available"] == 0 for r in answers if r.status_code == 409)
    live = await db.fetchval("SELECT count(*) FROM orders WHERE status = 'pending'")
    assert live == 100
    assert (await client.get("/api/products/P1001")).json()["available"] == 0
    await assert_invariants(db, redis, created=[r.json()["order_id"] for r in answers if r.status_code == 201])


async def test_random_quantities_never_oversell_and_leave_available_exact(client, db, redis):
    await make_product(client, total_stock=333)
    rng = random.Random(7)
    quantities = [rng.randint(1, 5) for _ in range(300)]

    async def order(i: int, qty: int):
        return await client.post("/api/preorder", json={"product_id": "P1001", "quantity": qty}, headers=TOKENS[i])

    answers = await asyncio.gather(*(order(i, q) for i, q in enumerate(quantities)))
    sold = sum(q for q, r in zip(quantities, answers, strict=True) if r.status_code == 201)
    assert {r.status_code for r in answers} <= {201, 409}
    assert sold <= 333
    assert 333 - sold < 5, "a refusal only happens when the asked quantity no longer fits"
    product = (await client.get("/api/products/P1001")).json()
    assert product["reserved"] == sold and product["available"] == 333 - sold
    await assert_invariants(db, redis, created=[r.json()["order_id"] for r in answers if r.status_code == 201])


async def test_per_user_limit_holds_under_concurrency(client, db, redis):
    await make_product(client, total_stock=1000, per_user_limit=3)
    one = bearer("U-greedy")
    answers = await asyncio.gather(*(
        client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=one) for _ in range(50)
    ))
    codes = [r.status_code for r in answers]
    assert codes.count(201) == 3 and codes.count(409) == 47
    refused = next(r for r in answers if r.status_code == 409).json()
    assert refused["type"] == "/problems/per-user-limit"
    assert await db.fetchval("SELECT sum(quantity) FROM orders WHERE user_id = 'U-greedy'") == 3
    other = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 3}, headers=bearer("U-x"))
    assert other.status_code == 201, "the limit is per customer"
    await assert_invariants(db, redis)


async def test_cancelling_frees_room_under_the_per_user_limit(client):
    await make_product(client, total_stock=10, per_user_limit=2)
    me = bearer("U-1")

    async def order(qty: int):
        return await client.post("/api/preorder", json={"product_id": "P1001", "quantity": qty}, headers=me)

    first = (await order(2)).json()
    assert (await order(1)).status_code == 409
    await client.delete(f"/api/preorder/{first['order_id']}", headers=me)
    assert (await order(2)).status_code == 201


async def test_concurrent_cancels_release_stock_once(client, db, redis):
    await make_product(client, total_stock=5)
    me = bearer("U-1")
    order = (await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 5}, headers=me)).json()
    answers = await asyncio.gather(*(
        client.delete(f"/api/preorder/{order['order_id']}", headers=me) for _ in range(20)
    ))
    assert {r.status_code for r in answers} <= {200, 409}
    assert (await client.get("/api/products/P1001")).json()["available"] == 5
    events = await db.fetchval("SELECT count(*) FROM order_events WHERE to_status = 'cancelled'")
    assert events == 1
    await assert_invariants(db, redis)


async def test_sold_out_is_answered_from_memory_until_this_process_gives_stock_back(settings, db, redis):
    marked = make_settings(settings.database_url, settings.redis_url, sold_out_ttl_ms=5_000)  # outlasts the test
    order = {"product_id": "P1001", "quantity": 1}
    async with serving(marked) as client:
        await make_product(client, total_stock=1)
        first = await client.post("/api/preorder", json=order, headers=TOKENS[0])
        assert first.status_code == 201
        assert (await client.post("/api/preorder", json=order, headers=TOKENS[1])).status_code == 409  # from Redis
        await reset_command_stats(redis)
        refused = [await client.post("/api/preorder", json=order, headers=TOKENS[i]) for i in range(2, 22)]
        assert {r.status_code for r in refused} == {409}
        assert {r.json()["type"] for r in refused} == {"/problems/out-of-stock"}
        assert await command_calls(redis, "evalsha") == 0, "a refusal costs no reserve call"
        assert await db.fetchval("SELECT count(*) FROM orders") == 1
        cancel = await client.delete(f"/api/preorder/{first.json()['order_id']}", headers=TOKENS[0])
        assert cancel.status_code == 200
        again = await client.post("/api/preorder", json=order, headers=TOKENS[30])
        assert again.status_code == 201, "the release cleared the mark at once"
    await assert_invariants(db, redis, created=[again.json()["order_id"]])
