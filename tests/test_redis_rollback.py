"""I1 when Redis goes back in time: its keys present, acknowledged holds missing (a restore from an earlier
snapshot, an asynchronous replica promoted). The epoch fence cannot see it; PostgreSQL's sold counter refuses
the oversell, and the service notices (a refused write, a counter below PostgreSQL's, a new Redis identity) and
rebuilds from PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from preorder.embedded import EmbeddedRedis
from preorder.stock.keys import product_keys
from preorder.workers.reconciler import Reconciler, RedisWatch
from tests.conftest import bearer, make_product
from tests.harness import RedisProxy, Traffic, burst, eventually
from tests.invariants import assert_invariants
from tests.test_faults import _pg_reserved, ordering_hot, settled

K = product_keys("P1001")


async def snapshot(redis: aioredis.Redis) -> dict[str, bytes]:
    """What a replica or an RDB file would hold at this moment: the product's keys, dumped."""
    return {k: await redis.dump(k) for k in K.scripts if await redis.exists(k)}


async def go_back_to(redis: aioredis.Redis, snap: dict[str, bytes]) -> None:
    await redis.delete(*K.scripts)
    for key, value in snap.items():
        await redis.restore(key, 0, value, replace=True)


async def orders(client: httpx.AsyncClient, traffic: Traffic, n: int) -> None:
    await burst(client, traffic, product_id="P1001", count=n, concurrency=10)


async def redis_reserved(redis: aioredis.Redis) -> int:
    return int(await redis.hget(K.stock, "reserved") or 0)


async def test_writes_granted_by_a_redis_that_went_back_in_time_are_refused_and_redis_is_rebuilt(
    client, db, redis
):
    await make_product(client, total_stock=40)
    traffic = Traffic()
    await orders(client, traffic, 15)
    earlier = await snapshot(redis)
    await orders(client, traffic, 25)
    assert traffic.statuses()[201] == 40, "sold out"
    await go_back_to(redis, earlier)
    assert await redis_reserved(redis) == 15, "Redis believes 25 units are free again"

    late = Traffic()
    await orders(client, late, 30)
    assert late.statuses()[201] == 0, "PostgreSQL refused every unit Redis granted again"
    late.assert_only({409, 503})
    late.assert_503s_are_problems()
    assert await _pg_reserved(db, "P1001") == 40

    async def rebuilt() -> None:
        assert await redis_reserved(redis) == 40, "rebuilt from PostgreSQL at once, not at the next pass"
    await eventually(rebuilt, within=10)
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=bearer("U-late"))
    assert r.status_code == 409 and r.json()["available"] == 0
    await assert_invariants(db, redis, created=traffic.created)


async def test_a_redis_behind_postgresql_with_stock_left_is_found_by_the_reconciler(app, client, db, redis):
    """Nothing sells out, so no write is refused: the regular pass compares the counters and rebuilds."""
    await make_product(client, total_stock=100)
    traffic = Traffic()
    await orders(client, traffic, 10)
    earlier = await snapshot(redis)
    await orders(client, traffic, 10)
    await go_back_to(redis, earlier)
    reconciler = Reconciler(app.state.stock, orphan_hold_s=60, full_interval_s=3600)
    done = await reconciler.run()
    assert done.behind == 1, done
    assert await redis_reserved(redis) == 20
    assert (await reconciler.run()).behind == 0, "a second pass finds nothing"
    await assert_invariants(db, redis, created=traffic.created)


async def test_a_redis_with_a_new_identity_has_every_loaded_product_rebuilt(app, db, tmp_path: Path):
    server = EmbeddedRedis(tmp_path / "redis", persist=True)
    server.start()
    own = aioredis.Redis.from_url(server.url)
    try:
        stock = app.state.stock.__class__(own, app.state.pool)
        for pid in ("A1", "A2"):
            await db.execute("INSERT INTO products (id, name, price_amount, currency, total_stock) "
                             "VALUES ($1, 'p', 100, 'USD', 5)", pid)
        await stock.ensure_loaded("A1")  # A2 is never loaded: nothing to rebuild
        watch = RedisWatch(stock)
        assert await watch.check() == 0, "the first identity seen is the reference"
        assert await watch.check() == 0
        server.stop()
        server.start()  # the same port and data (AOF), a new run id: as after a restore or a failover
        await own.connection_pool.disconnect()  # this test's client: its connection died with the server
        epoch = int(await own.hget(product_keys("A1").stock, "epoch"))
        assert await watch.check() == 1
        assert int(await own.hget(product_keys("A1").stock, "epoch")) == epoch + 1
        assert not await own.exists(product_keys("A2").stock)
    finally:
        await own.aclose()
        server.stop()


# ---- real processes and real Redis servers ---------------------------------------------------------------

@pytest.mark.faults
async def test_a_snapshot_restored_under_load_never_oversells(db, tmp_path: Path, servers_for):
    """Redis saved at one moment, killed later, and started again from that save while customers order."""
    redis_server = EmbeddedRedis(tmp_path / "redis", persist=False)  # no AOF: a start loads dump.rdb
    redis_server.start()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with ordering_hot(servers_for(redis_server.url), total_stock=300, workers=20) as (_, traffic):
            await traffic.reached(80)
            await client.save()
            saved = int(await client.hget(product_keys("HOT").stock, "reserved"))
            await traffic.reached(220)
            epoch = await _epoch(db)
            sold_at_kill = await _pg_reserved(db, "HOT")
            redis_server.kill()
            redis_server.start()  # back to the save: the holds acknowledged since are gone, the keys are there
            await client.connection_pool.disconnect()  # this test's own client: its connection died
            assert sold_at_kill - saved > 20, "Redis really went back in time"
            await asyncio.wait_for(_sold_out(traffic), timeout=60)
        assert await _epoch(db) > epoch, "the product was rebuilt from PostgreSQL"
        await _assert_sold_exactly(db, traffic, 300)
        await settled(db, client, traffic)
    finally:
        await client.aclose()
        redis_server.stop()


@pytest.mark.faults
async def test_a_replica_promoted_while_orders_stream_in_never_oversells(db, tmp_path: Path, servers_for):
    """A primary and its asynchronous replica; the link between them goes dark (the replica falls behind), the
    primary dies, the replica is promoted, and the app's address now leads to it, as Sentinel or a floating
    address would arrange."""
    primary = EmbeddedRedis(tmp_path / "primary", persist=False)
    primary.start()
    link = RedisProxy(primary.port)  # replication goes through it, so it can be cut
    await link.start()
    replica = EmbeddedRedis(tmp_path / "replica", persist=False,
                            extra_args=("--replicaof", "127.0.0.1", str(link.port)))
    replica.start()
    replica_client = aioredis.Redis.from_url(replica.url)
    app_address = RedisProxy(primary.port)
    await app_address.start()
    try:
        await eventually(lambda: _in_sync(replica_client), within=20)
        async with ordering_hot(servers_for(app_address.url), total_stock=300, workers=20) as (_, traffic):
            await traffic.reached(80)
            link.cut("blackhole")  # from here on the replica receives nothing
            await traffic.reached(220)
            primary.kill()
            await replica_client.replicaof("NO", "ONE")
            held = int(await replica_client.hget(product_keys("HOT").stock, "reserved"))
            assert await _pg_reserved(db, "HOT") - held > 20, "the promoted replica lacks acknowledged holds"
            epoch = await _epoch(db)
            app_address.retarget(replica.port)
            await asyncio.wait_for(_sold_out(traffic, after=len(traffic.answers)), timeout=60)
        assert await _epoch(db) > epoch, "the product was rebuilt from PostgreSQL"
        await _assert_sold_exactly(db, traffic, 300)
        await settled(db, replica_client, traffic)
    finally:
        await replica_client.aclose()
        await app_address.close()
        await link.close()
        replica.stop()
        primary.stop()


async def _epoch(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT stock_epoch FROM products WHERE id = 'HOT'"))


async def _in_sync(replica: aioredis.Redis) -> None:
    info = await replica.info("replication")
    assert info["role"] == "slave" and info["master_link_status"] == "up", info


async def _sold_out(traffic: Traffic, *, after: int = 0) -> None:
    while not any(a.status == 409 for a in traffic.answers[after:]):
        await traffic.reached(len(traffic.answers) + 1)


async def _assert_sold_exactly(db: asyncpg.Connection, traffic: Traffic, total: int) -> None:
    traffic.assert_only({201, 409, 503})
    traffic.assert_503s_are_problems()
    assert await _pg_reserved(db, "HOT") == total, "never over (I1), and nothing left unsold once rebuilt"
    assert sum(traffic.created.values()) == total, "every unit sold was answered 201 exactly once"
