"""I4 for creates: a retried create with the same Idempotency-Key makes at most one order."""

from __future__ import annotations

import asyncio
from collections import Counter

from preorder.stock.keys import product_keys
from tests.conftest import bearer, make_product, make_settings, serving
from tests.invariants import assert_invariants

ME = bearer("U-idem")
BODY = {"product_id": "P1001", "quantity": 2}


def keyed(key: str) -> dict[str, str]:
    return {**ME, "Idempotency-Key": key}


async def test_retry_with_the_same_key_and_body_replays_the_first_answer(client, db, redis):
    await make_product(client, total_stock=10)
    first = await client.post("/api/preorder", json=BODY, headers=keyed("k-1"))
    again = await client.post("/api/preorder", json=BODY, headers=keyed("k-1"))
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["order_id"] == first.json()["order_id"]
    assert again.headers["location"] == first.headers["location"]
    assert await db.fetchval("SELECT count(*) FROM orders") == 1
    assert (await client.get("/api/products/P1001")).json()["reserved"] == 2, "stock taken once"
    await assert_invariants(db, redis, created={first.json()["order_id"]: 2})


async def test_a_retry_after_the_product_sold_out_still_replays_the_order(client, db, redis):
    await make_product(client, total_stock=2)
    first = await client.post("/api/preorder", json=BODY, headers=keyed("k-sold"))
    late = await client.post("/api/preorder", json=BODY, headers=bearer("U-late"))
    assert first.status_code == 201 and late.status_code == 409, "sold out now, and this process knows it"
    again = await client.post("/api/preorder", json=BODY, headers=keyed("k-sold"))
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["order_id"] == first.json()["order_id"]
    await assert_invariants(db, redis, created={first.json()["order_id"]: 2})


async def test_same_key_with_another_body_is_refused_with_422(client, db, redis):
    await make_product(client, total_stock=10)
    assert (await client.post("/api/preorder", json=BODY, headers=keyed("k-2"))).status_code == 201
    other = await client.post("/api/preorder", json={**BODY, "quantity": 3}, headers=keyed("k-2"))
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["type"] == "/problems/idempotency-key-reused"
    assert await db.fetchval("SELECT count(*) FROM orders") == 1
    await assert_invariants(db, redis)


async def test_the_same_key_from_another_customer_is_another_request(client, db, redis):
    await make_product(client, total_stock=10)
    mine = await client.post("/api/preorder", json=BODY, headers=keyed("k-3"))
    theirs = await client.post("/api/preorder", json=BODY, headers={**bearer("U-other"), "Idempotency-Key": "k-3"})
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["order_id"] != theirs.json()["order_id"]
    await assert_invariants(db, redis)


async def test_20_concurrent_identical_retries_make_exactly_one_order(client, db, redis):
    await make_product(client, total_stock=10)
    answers = await asyncio.gather(*(
        client.post("/api/preorder", json=BODY, headers=keyed("k-burst")) for _ in range(20)
    ))
    codes = Counter(r.status_code for r in answers)
    assert set(codes) <= {201, 409}, codes
    made = [r for r in answers if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(made) == 1, "exactly one request made the order; the others replayed it or were told to wait"
    replays = [r for r in answers if r.status_code == 201 and r.headers.get("idempotent-replayed") == "true"]
    assert {r.json()["order_id"] for r in replays} <= {made[0].json()["order_id"]}
    for r in answers:
        if r.status_code == 409:
            assert r.json()["type"] == "/problems/idempotency-in-progress"
    assert await db.fetchval("SELECT count(*) FROM orders") == 1
    stock, holds = product_keys("P1001").stock, product_keys("P1001").holds
    assert int(await redis.hget(stock, "reserved")) == 2 and await redis.hlen(holds) == 1, "stock taken once"
    late = await client.post("/api/preorder", json=BODY, headers=keyed("k-burst"))
    assert late.status_code == 201 and late.json()["order_id"] == made[0].json()["order_id"]
    await assert_invariants(db, redis, created={made[0].json()["order_id"]: 2})


async def test_a_key_whose_first_attempt_failed_makes_the_order_on_retry(client, db, redis):
    """The failed write stored no idempotency record (one statement with the order): the retry is a new attempt."""
    await make_product(client, total_stock=10)
    await db.execute("CREATE FUNCTION refuse_orders() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$BEGIN RAISE EXCEPTION 'injected: orders refused'; END$$")
    await db.execute("CREATE TRIGGER refuse_orders BEFORE INSERT ON orders "
                     "FOR EACH ROW EXECUTE FUNCTION refuse_orders()")
    try:
        failed = await client.post("/api/preorder", json=BODY, headers=keyed("k-4"))
    finally:
        await db.execute("DROP TRIGGER refuse_orders ON orders; DROP FUNCTION refuse_orders()")
    assert failed.status_code == 503
    retried = await client.post("/api/preorder", json=BODY, headers=keyed("k-4"))
    assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers
    assert await db.fetchval("SELECT count(*) FROM orders") == 1
    await assert_invariants(db, redis, created={retried.json()["order_id"]: 2})


async def test_idempotent_create_works_with_a_sub_second_write_deadline(settings, db, redis):
    """The in-progress marker lives as long as a create may run; a short deadline must not make it invalid."""
    fast = make_settings(settings.database_url, settings.redis_url,
                         db_statement_timeout_ms=200, write_deadline_s=0.4, orphan_hold_s=1)
    async with serving(fast) as c:
        await make_product(c, total_stock=10)
        first = await c.post("/api/preorder", json=BODY, headers=keyed("k-5"))
        again = await c.post("/api/preorder", json=BODY, headers=keyed("k-5"))
    assert first.status_code == 201, first.text
    assert again.status_code == 201 and again.json()["order_id"] == first.json()["order_id"]
    await assert_invariants(db, redis, created={first.json()["order_id"]: 2})


