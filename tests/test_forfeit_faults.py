"""Faults during the forfeiture of a large batch, with a real `preorder serve` and its own sweeper: a balance window
closes on 20,000 deposit-paid orders while customers order another product, and then
- the service is killed with SIGKILL between forfeiture statements that committed and their stock releases in
  Redis (Redis writes are paused, so every round commits its batch and cannot release it), then restarted;
- Redis loses everything mid-forfeiture: restarted empty, or FLUSHALL.
After recovery and the sweeper's rounds: every order forfeited exactly once (one event each), its stock released
once, the deposits kept, and I1-I6 hold."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from preorder import db as dbmod
from preorder.cache import RedisClient
from preorder.stock.keys import product_keys
from preorder.stock.service import Stock
from tests.conftest import ON_CLUSTER
from tests.harness import Server, Traffic, eventually, new_product, seed_deposit_paid, steady
from tests.invariants import assert_invariants

N = 20_000
RECOVER_S = 120  # 20,000 forfeitures take seconds; this leaves room for a loaded 2-core machine and a restart

pytestmark = pytest.mark.faults


async def _forfeited(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM orders WHERE product_id = 'PD' AND status = 'forfeited'"))


async def _forfeited_at_least(db: asyncpg.Connection, n: int) -> None:
    assert await _forfeited(db) >= n


@contextlib.asynccontextmanager
async def closing_window(server: Server, db: asyncpg.Connection, redis: RedisClient, settings
                         ) -> AsyncIterator[Traffic]:
    """The server started; PD (a deposit product) with N deposit-paid orders, their units held in Redis; creates
    on PF running; then PD's balance window closes (the orders' deadline moved into the past) and the block runs
    while the server's sweeper forfeits them. The creates stop on the way out."""
    await server.start()
    now = datetime.now(UTC)
    async with server.client() as c:
        await new_product(c, "PD", price_amount=1000, total_stock=N, payment_plan="deposit", deposit_amount=100,
                          balance_starts_at=(now + timedelta(hours=1)).isoformat(),
                          balance_ends_at=(now + timedelta(hours=2)).isoformat())
        await new_product(c, "PF", price_amount=500, total_stock=1_000_000)
        await seed_deposit_paid(db, N, "PD", now + timedelta(hours=1), now + timedelta(hours=2))
        pool = await dbmod.create_pool(settings)
        try:
            await Stock(redis, pool).rebuild("PD")  # Redis now holds the seeded orders' units
        finally:
            await pool.close()
        assert (await c.get("/api/products/PD")).json()["reserved"] == N
        traffic, stop = Traffic(), asyncio.Event()
        load = asyncio.create_task(steady(c, traffic, stop, product_id="PF", workers=5))
        try:
            await traffic.reached(20)
            await db.execute("UPDATE orders SET balance_starts_at = now() - interval '2 hours', "
                             "balance_ends_at = now() - interval '1 second' WHERE product_id = 'PD'")
            yield traffic
        finally:
            stop.set()
            await load


async def recovered(db: asyncpg.Connection, redis: RedisClient, server: Server, traffic: Traffic) -> None:
    """Every order forfeited, its stock back in Redis and PostgreSQL, one forfeited event each, I1-I6."""
    await eventually(lambda: _forfeited_at_least(db, N), within=RECOVER_S, interval=0.2)
    async with server.client() as c:  # a product Redis lost is loaded again by its first read
        assert (await c.get("/api/products/PD")).status_code == 200
        assert (await c.get("/api/products/PF")).status_code == 200
    await eventually(lambda: assert_invariants(db, redis, created=traffic.created), within=RECOVER_S, interval=0.5)
    assert await db.fetchval("SELECT sold FROM products WHERE id = 'PD'") == 0
    assert int(await redis.hget(product_keys("PD").stock, "reserved")) == 0
    events = await db.fetchrow("SELECT count(*) AS n, count(DISTINCT order_id) AS orders FROM order_events "
                               "WHERE type = 'forfeited'")
    assert (events["n"], events["orders"]) == (N, N), "each order forfeited (and released) once"
    assert await db.fetchval("SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id "
                             "WHERE o.product_id = 'PD'") == 0, "the deposits are kept"


@pytest.mark.skipif(ON_CLUSTER, reason="CLIENT PAUSE on one server; the cluster suite kills a primary")
async def test_kill_9_between_forfeitures_and_their_releases(db, own_redis, own_redis_client, servers_for, settings):
    server = servers_for(own_redis.url)
    async with closing_window(server, db, own_redis_client, settings) as traffic:
        # Writes paused: each sweeper round commits a batch of forfeitures and then waits for Redis in vain.
        await own_redis_client.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        try:
            await eventually(lambda: _forfeited_at_least(db, 2_000), within=60, interval=0.05)
            server.kill()
        finally:
            await own_redis_client.execute_command("CLIENT", "UNPAUSE")
        at_kill = await _forfeited(db)
    assert 0 < at_kill < N, at_kill
    holds = await own_redis_client.hlen(product_keys("PD").holds)
    assert holds > N - at_kill, "the kill left holds of forfeited orders in Redis (the window under test)"
    assert {a.status for a in traffic.answers} <= {0, 201, 503}, traffic.statuses()
    await server.start()  # the same port, a new process: its sweeper and reconciler finish the job
    print(f"\nkilled with {at_kill} of {N} forfeited and {holds - (N - at_kill)} of their holds still in Redis")
    await recovered(db, own_redis_client, server, traffic)


@pytest.mark.parametrize("loss", [
    pytest.param("restart_empty", marks=pytest.mark.skipif(ON_CLUSTER, reason="one server restarted empty")),
    "flushall",
])
async def test_redis_loses_everything_mid_forfeiture(db, own_redis, own_redis_client, servers_for, settings, loss):
    server = servers_for(own_redis.url)
    async with closing_window(server, db, own_redis_client, settings) as traffic:
        await eventually(lambda: _forfeited_at_least(db, 2_000), within=60, interval=0.05)
        at_loss = await _forfeited(db)
        if loss == "flushall":
            await own_redis_client.flushall()
        else:
            own_redis.kill()  # no persistence: every key is lost
            own_redis.start()  # same port, empty
            with contextlib.suppress(RedisConnectionError):  # this test's own pooled connection died with it
                await own_redis_client.ping()
        await asyncio.wait_for(traffic.reached(len(traffic.answers) + 20), 60)  # creates go on after the loss
    assert at_loss < N, "the loss came during the forfeiture"
    traffic.assert_only({201, 503})
    traffic.assert_503s_are_problems()
    print(f"\nRedis lost ({loss}) with {at_loss} of {N} forfeited")
    await recovered(db, own_redis_client, server, traffic)
