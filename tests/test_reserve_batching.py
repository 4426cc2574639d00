"""The reservations of one loop turn go to Redis as one script call per product. A batched call must decide
exactly what the same asks decide one call at a time, in the same order: same answers, same counters."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

from preorder.cache import RedisClient
from preorder.stock.batching import ScriptBatcher
from preorder.stock.keys import product_keys
from preorder.stock.service import _script
from tests.conftest import command_calls, reset_command_stats

LIMITS = (4, 9, 60_000)  # per customer, per address, window ms: small, so batches cross them


def _head(product: str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    return product_keys(product).reserve_head, LIMITS


async def _load(redis: RedisClient, product: str, *, total: int, limit: int) -> None:
    await redis.hset(f"po:{{{product}}}:stock", mapping={
        "epoch": 1, "total": total, "reserved": 0, "starts": 0, "ends": 0, "limit": limit})


def _asks(rng: random.Random, product: str, n: int) -> list[tuple[list[str], list[Any]]]:
    tag = product_keys(product).tag
    asks = []
    for _ in range(n):
        user, client = f"u{rng.randint(1, 6)}", f"10.0.0.{rng.randint(1, 3)}"
        order = str(uuid.UUID(int=rng.getrandbits(128))) if rng.random() > 0.05 or not asks else asks[-1][1][0]
        asks.append(([f"{tag}:rl:u:{user}", f"{tag}:rl:c:{client}"], [order, rng.randint(1, 4), user]))
    return asks


async def _state(redis: RedisClient, product: str) -> dict[str, Any]:
    tag = product_keys(product).tag
    holds = {k: v.rsplit(b":", 1)[0] for k, v in (await redis.hgetall(f"{tag}:holds")).items()}  # drop the time
    rates = {k.decode().rsplit(":", 2)[-1]: await redis.get(k) async for k in redis.scan_iter(f"{tag}:rl:*")}
    fresh = [oid for oid, _ in await redis.zrange(f"{tag}:fresh", 0, -1, withscores=True)]
    return {"reserved": await redis.hget(f"{tag}:stock", "reserved"), "holds": holds,
            "users": await redis.hgetall(f"{tag}:users"), "rates": rates, "fresh": sorted(fresh)}


def _comparable(answer: list[Any]) -> list[Any]:
    """Without what depends on the clock: the reservation time, and the rate window's time left."""
    if answer[0] == b"OK":
        return [answer[0], answer[1], answer[3]]
    if answer[0] == b"RATE_LIMITED":
        assert 0 < answer[1] <= LIMITS[2]
        return [answer[0]]
    return answer


async def test_a_batched_call_decides_exactly_what_one_call_per_ask_decides(redis: RedisClient) -> None:
    script = redis.register_script(_script("reserve.lua"))
    batcher = ScriptBatcher(redis, script)
    outcomes: set[bytes] = set()
    for seed in range(60):
        rng = random.Random(seed)
        await redis.flushdb()
        total, limit = rng.randint(0, 40), rng.choice([0, 0, 3, 7])
        asks = _asks(rng, "B", rng.randint(1, 60))
        await _load(redis, "B", total=total, limit=limit)
        await _load(redis, "S", total=total, limit=limit)

        batched = await asyncio.gather(*(batcher(_head("B"), keys=k, args=a) for k, a in asks))
        one_by_one = []
        for keys, args in asks:
            keys = [k.replace("{B}", "{S}") for k in keys]
            head_keys, head_args = _head("S")
            one_by_one.append((await script(keys=[*head_keys, *keys], args=[*head_args, *args]))[0])

        assert [_comparable(a) for a in batched] == [_comparable(a) for a in one_by_one], seed
        assert await _state(redis, "B") == await _state(redis, "S"), seed
        outcomes |= {a[0] for a in batched}
    assert outcomes >= {b"OK", b"OUT_OF_STOCK", b"USER_LIMIT", b"RATE_LIMITED", b"DUPLICATE"}, outcomes


async def test_one_loop_turn_of_asks_is_one_script_call_per_product(redis: RedisClient) -> None:
    script = redis.register_script(_script("reserve.lua"))
    await script(keys=[*_head("X")[0]], args=[*LIMITS])  # loads the script; no asks, no effect
    batcher = ScriptBatcher(redis, script, max_asks=64)
    for product in ("X", "Y"):
        await _load(redis, product, total=1000, limit=0)
    await reset_command_stats(redis)

    def ask(product: str, i: int) -> asyncio.Future[Any]:
        tag = product_keys(product).tag
        keys = [f"{tag}:rl:u:a{i}", f"{tag}:rl:c:c{i}"]
        return batcher(_head(product), keys=keys, args=[str(uuid.uuid4()), 1, f"a{i}"])

    answers = await asyncio.gather(*(ask("X", i) for i in range(100)), *(ask("Y", i) for i in range(10)))
    assert [a[0] for a in answers] == [b"OK"] * 110
    calls = await command_calls(redis, "evalsha")
    assert calls == 3, "100 asks for X in calls of at most 64, and 10 for Y: three script calls"
    assert int(await redis.hget("po:{X}:stock", "reserved")) == 100
