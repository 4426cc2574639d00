"""`preorder reconcile` (the real command, as a subprocess): reports drift between Redis and PostgreSQL and exits
non-zero; `--fix` repairs it and exits 0; a plain run afterwards finds nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import pytest

from preorder.stock.keys import product_keys
from tests.conftest import bearer, make_product
from tests.harness import PREORDER, server_env
from tests.invariants import assert_invariants

pytestmark = pytest.mark.faults  # starts processes
_K = product_keys("P1001")
STOCK, HOLDS, USERS = _K.stock, _K.holds, _K.users
ME = bearer("U-rec")


@dataclass
class Run:
    code: int
    out: str


@pytest.fixture
def reconcile(settings):
    async def run(*args: str) -> Run:
        # A hold counts as young for 30 s: a starting subprocess on a loaded machine can take longer than the
        # fault suite's 2.5 s (the orphans these tests plant are ten minutes old).
        env = server_env(settings.database_url, settings.redis_url, PREORDER_ORPHAN_HOLD_S="30")
        proc = await asyncio.create_subprocess_exec(
            str(PREORDER), "reconcile", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        return Run(proc.returncode if proc.returncode is not None else -1, out.decode())

    return run


def line_of(run: Run, product_id: str = "P1001") -> list[str]:
    lines = [line.split() for line in run.out.splitlines() if line.startswith(product_id)]
    assert lines, run.out
    return lines[0]


async def orders(client, n: int, qty: int = 2) -> list[str]:
    made = []
    for _ in range(n):
        r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": qty}, headers=ME)
        assert r.status_code == 201, r.text
        made.append(r.json()["order_id"])
    return made


async def test_counter_drift_is_reported_then_fixed(client, db, redis, reconcile):
    await make_product(client, total_stock=10)
    await orders(client, 2)
    await redis.hincrby(STOCK, "reserved", 3)  # a leak: Redis thinks 3 more are taken
    found = await reconcile()
    assert found.code == 1, found.out
    assert line_of(found) == ["P1001", "10", "4", "10", "7", "0", "DRIFT"], found.out
    assert "1 of 1 products drifted" in found.out
    fixed = await reconcile("--fix")
    assert fixed.code == 0, fixed.out
    assert "rebuilt P1001 from PostgreSQL" in fixed.out
    clean = await reconcile()
    assert clean.code == 0 and line_of(clean)[-1] == "ok", clean.out
    assert int(await redis.hget(STOCK, "reserved")) == 4
    await assert_invariants(db, redis)


async def test_orphan_hold_is_drift_and_fix_releases_it(client, db, redis, reconcile):
    """A process killed between reserve and write leaves a hold no order will ever claim."""
    await make_product(client, total_stock=10)
    await orders(client, 1)
    orphan = str(uuid.uuid4())
    ten_minutes_ago_ms = int(time.time() * 1000) - 600_000
    await redis.hset(HOLDS, orphan, f"3:U-ghost:{ten_minutes_ago_ms}")
    await redis.hincrby(STOCK, "reserved", 3)
    await redis.hincrby(USERS, "U-ghost", 3)
    found = await reconcile()
    assert found.code == 1 and line_of(found)[-1] == "DRIFT", found.out
    fixed = await reconcile("--fix")
    assert fixed.code == 0 and "orphans=1" in fixed.out, fixed.out
    assert await redis.hget(HOLDS, orphan) is None
    clean = await reconcile()
    assert clean.code == 0 and line_of(clean)[-1] == "ok", clean.out
    await assert_invariants(db, redis)


async def test_young_hold_without_an_order_is_in_flight_not_drift(client, db, redis, reconcile):
    await make_product(client, total_stock=10)
    in_flight = str(uuid.uuid4())
    await redis.hset(HOLDS, in_flight, f"2:U-slow:{int(time.time() * 1000)}")
    await redis.hincrby(STOCK, "reserved", 2)
    await redis.hincrby(USERS, "U-slow", 2)
    seen = await reconcile("--fix")
    assert seen.code == 0 and line_of(seen)[-2:] == ["2", "ok"], seen.out
    assert await redis.hget(HOLDS, in_flight) is not None, "its write may still land: the hold stays"
    await assert_invariants(db, redis, settled=False)  # in flight: I2 only once it is settled


async def test_hold_of_an_order_cancelled_behind_redis_back_is_released_by_fix(client, db, redis, reconcile):
    """The app died after committing a cancel and before releasing the hold."""
    await make_product(client, total_stock=10)
    gone, kept = await orders(client, 2)
    await db.execute("UPDATE orders SET status = 'cancelled' WHERE id = $1", uuid.UUID(gone))
    await db.execute("INSERT INTO order_events (order_id, from_status, to_status, actor, reason) "
                     "VALUES ($1, 'pending', 'cancelled', 'U-rec', 'test')", uuid.UUID(gone))
    found = await reconcile()
    assert found.code == 1 and line_of(found)[3:5] == ["10", "4"], found.out
    fixed = await reconcile("--fix")
    assert fixed.code == 0 and "released=1" in fixed.out, fixed.out
    assert await redis.hget(HOLDS, gone) is None and await redis.hget(HOLDS, kept) is not None
    assert (await reconcile()).code == 0
    await assert_invariants(db, redis)


async def test_redis_left_at_an_older_epoch_is_drift_and_fix_rebuilds_it(client, db, redis, reconcile):
    """A loader committed a new epoch and died before loading Redis: every write would be fenced out."""
    await make_product(client, total_stock=10)
    await orders(client, 1)
    await db.execute("UPDATE products SET stock_epoch = stock_epoch + 1")
    found = await reconcile()
    assert found.code == 1 and line_of(found)[-1] == "DRIFT", found.out
    fixed = await reconcile("--fix")
    assert fixed.code == 0 and "rebuilt=1" in fixed.out, fixed.out
    assert (await reconcile()).code == 0
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=ME)
    assert r.status_code == 201, r.text
    await assert_invariants(db, redis)
