"""The stock scripts refuse malformed state instead of acting on it, and one bad ask fails alone."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from preorder.stock.keys import product_keys
from preorder.stock.service import Ask, Stock, _script
from tests.conftest import bearer, make_product
from tests.harness import eventually
from tests.invariants import assert_invariants

K = product_keys("P1001")


async def test_release_of_a_malformed_hold_changes_nothing(redis: aioredis.Redis) -> None:
    release = redis.register_script(_script("release.lua"))
    await redis.hset(K.stock, mapping={"epoch": 1, "total": 10, "reserved": 3, "starts": 0, "ends": 0, "limit": 0})
    await redis.hset(K.holds, "o1", "x:U1:123")
    try:
        await release(keys=list(K.scripts), args=["o1", "release"])
        raise AssertionError("a malformed hold must be refused")
    except ResponseError as exc:
        assert "malformed hold" in str(exc)
    assert await redis.hget(K.holds, "o1") == b"x:U1:123", "the hold is still there for an operator to see"
    assert await redis.hget(K.stock, "reserved") == b"3", "nothing was given back"


async def test_release_many_gives_back_each_hold_once_and_leaves_a_malformed_one(redis: aioredis.Redis) -> None:
    release_many = redis.register_script(_script("release_many.lua"))
    await redis.hset(K.stock, mapping={"epoch": 1, "total": 10, "reserved": 6, "starts": 0, "ends": 0, "limit": 0})
    await redis.hset(K.holds, mapping={"o1": "2:U1:1", "o2": "1:U1:2", "o3": "x:U2:3", "o4": "3:U2:4"})
    await redis.hset(K.users, mapping={"U1": 3, "U2": 3})
    await redis.zadd(K.fresh, {"o1": 1, "o2": 2})
    answer = await release_many(keys=list(K.scripts), args=["o1", "o2", "o3", "o4", "o5"])
    assert answer == [6, 3, b"o3"], "o5 has no hold; o3 is malformed and named"
    assert await redis.hgetall(K.holds) == {b"o3": b"x:U2:3"}, "the malformed hold is left for an operator"
    assert await redis.hget(K.stock, "reserved") == b"0"
    assert await redis.hgetall(K.users) == {}, "each customer's count reached 0 and was removed"
    assert await redis.zcard(K.fresh) == 0
    assert await release_many(keys=list(K.scripts), args=["o1", "o2", "o4"]) == [0, 0], "a second call: nothing"
    await redis.delete(K.stock)
    assert await release_many(keys=list(K.scripts), args=["o3"]) == [0, 0], "no counters: nothing to give back to"


async def test_a_rate_counter_without_a_ttl_refuses_for_one_window_then_lets_through(redis: aioredis.Redis) -> None:
    reserve = redis.register_script(_script("reserve.lua"))
    await redis.hset(K.stock, mapping={"epoch": 1, "total": 10, "reserved": 0, "starts": 0, "ends": 0, "limit": 0})
    await redis.set(K.rate_user("U1"), 5)  # at the limit, and no TTL: the state that used to fail open
    window_ms = 300
    args = [5, 100, window_ms, str(uuid.uuid4()), 1, "U1"]
    keys = [*K.reserve_head, K.rate_user("U1"), K.rate_client("c")]
    (answer,) = await reserve(keys=keys, args=args)
    assert answer[0] == b"RATE_LIMITED" and 0 < answer[1] <= window_ms, answer
    assert 0 < await redis.pttl(K.rate_user("U1")) <= window_ms, "the counter got its window"

    async def window_over() -> None:
        assert not await redis.exists(K.rate_user("U1")), "the counter has not expired yet"

    await eventually(window_over, within=10)
    (again,) = await reserve(keys=keys, args=[5, 100, window_ms, str(uuid.uuid4()), 1, "U1"])
    assert again[0] == b"OK"


async def test_one_failing_ask_in_a_batch_answers_503_alone(client, db, redis: aioredis.Redis, app) -> None:
    await make_product(client, total_stock=100)
    await redis.hset(K.rate_user("U-bad"), "not", "a counter")  # a key of the wrong type: GET on it errors

    async def order(user: str) -> int:
        r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=bearer(user))
        if r.status_code == 503:
            assert r.headers["content-type"] == "application/problem+json" and r.headers["retry-after"]
        return r.status_code

    users = [f"U{i}" for i in range(20)]
    users.insert(7, "U-bad")
    statuses = await asyncio.gather(*(order(u) for u in users))
    assert statuses[7] == 503, statuses
    assert statuses[:7] + statuses[8:] == [201] * 20, "the other asks of the same script call went through"
    assert int(await redis.hget(K.stock, "reserved")) == 20
    created = {r["id"]: 1 for r in await db.fetch("SELECT id::text FROM orders")}
    assert len(created) == 20
    await assert_invariants(db, redis, created=created)


async def test_a_whole_script_call_failing_answers_503(app, client, db, redis: aioredis.Redis) -> None:
    await make_product(client, total_stock=5)
    stock: Stock = app.state.stock
    await redis.delete(K.stock)
    await redis.set(K.stock, "a string, not the stock hash")  # HMGET on it errors before any ask runs
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=bearer("U1"))
    assert r.status_code == 503 and r.json()["type"].endswith("unavailable"), r.text
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    await redis.delete(K.stock)
    await stock.ensure_loaded("P1001")
    ask = Ask(product_id="P1001", order_id=uuid.uuid4(), quantity=1, user_id="U1", client="c")
    assert (await stock.reserve(ask)).available == 4, "rebuilt from PostgreSQL and working again"
