"""Redis Cluster, for real: a 3 primary + 3 replica cluster on loopback (the suite's own redis-server binary),
the service configured with redis+cluster://. Products spread over the primaries, each in one slot; one loop
turn's reserves go to each node together; and the faults a cluster adds: a primary killed (its replica takes
over), FLUSHALL on one node, a product's slot migrated to another primary while orders stream in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from preorder import cache
from preorder.embedded import EmbeddedRedis, EmbeddedRedisCluster
from preorder.stock.batching import ScriptBatcher
from preorder.stock.keys import product_keys
from preorder.stock.service import _script
from tests.conftest import make_settings, redis_client, reset_command_stats, running
from tests.harness import Traffic, burst, new_product
from tests.test_faults import _pg_reserved, burst_with_faults, ordering_hot, settled

pytestmark = pytest.mark.faults


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedRedisCluster]:
    """A cluster of this test alone: some tests kill its nodes or move its slots."""
    with running(EmbeddedRedisCluster(tmp_path / "cluster")) as started:
        yield started


@pytest.fixture
async def cluster_client(cluster: EmbeddedRedisCluster) -> AsyncIterator[RedisCluster]:
    client = redis_client(cluster.url)
    assert isinstance(client, RedisCluster)
    await client.initialize()
    yield client
    await client.aclose()


def owner(client: RedisCluster, product_id: str) -> ClusterNode:
    return client.get_node_from_key(product_keys(product_id).stock)


def products_on_each_primary(client: RedisCluster, per_primary: int) -> dict[str, list[str]]:
    """Product ids whose slots the primaries own, per_primary of them for each (by primary name)."""
    found: dict[str, list[str]] = {p.name: [] for p in client.get_primaries()}
    i = 0
    while any(len(ids) < per_primary for ids in found.values()):
        pid, i = f"P{i:04d}", i + 1
        ids = found[owner(client, pid).name]
        if len(ids) < per_primary:
            ids.append(pid)
    return found


def test_a_cluster_url_makes_a_cluster_client_and_a_plain_one_does_not() -> None:
    settings = make_settings("x", "redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert isinstance(cache.create_redis(settings), RedisCluster)
    assert isinstance(cache.create_redis(make_settings("x", "redis://127.0.0.1:6379/0")), aioredis.Redis)


async def test_every_key_of_a_product_shares_one_slot_and_products_spread_over_the_primaries(cluster_client):
    spread = products_on_each_primary(cluster_client, 2)
    assert len(spread) == 3
    for pid in (p for ids in spread.values() for p in ids):
        k = product_keys(pid)
        keys = [*k.scripts, k.rate_user("U1"), k.rate_client("127.0.0.1")]
        assert len({cluster_client.keyslot(key) for key in keys}) == 1, pid


async def test_one_turn_of_asks_for_products_on_every_node_is_one_script_call_per_product(cluster_client):
    script = cluster_client.register_script(_script("reserve.lua"))
    batcher = ScriptBatcher(cluster_client, script)
    spread = products_on_each_primary(cluster_client, 2)
    products = [pid for ids in spread.values() for pid in ids]
    for pid in products:
        await cluster_client.hset(product_keys(pid).stock, mapping={
            "epoch": 1, "total": 1000, "reserved": 0, "starts": 0, "ends": 0, "limit": 0})

    async def one_turn(turn: int) -> None:
        def ask(pid: str, i: int) -> asyncio.Future[Any]:
            k = product_keys(pid)
            head = (k.reserve_head, (1_000_000, 1_000_000, 1000))
            keys = [k.rate_user(f"u{i}"), k.rate_client("c")]
            return batcher(head, keys=keys, args=[f"order-{pid}-{turn}-{i}", 1, f"u{i}"])

        await reset_command_stats(cluster_client)
        answers = await asyncio.gather(*(ask(pid, i) for pid in products for i in range(20)))
        assert [a[0] for a in answers] == [b"OK"] * len(answers)

    await one_turn(1)  # the script is not loaded yet: every node answers NOSCRIPT first
    assert await _evalsha_calls(cluster_client) == {p: 2 + 2 for p in spread}, "NOSCRIPT, then 1 per product"
    await one_turn(2)
    assert await _evalsha_calls(cluster_client) == {p: 2 for p in spread}, "one call per product"
    flushed = cluster_client.get_primaries()[0]
    await cluster_client.execute_command("SCRIPT FLUSH", target_nodes=flushed)  # one node forgets the script
    await one_turn(3)
    assert (await _evalsha_calls(cluster_client))[flushed.name] == 2 + 2, "that node's calls ran again once"
    for pid in products:
        assert int(await cluster_client.hget(product_keys(pid).stock, "reserved")) == 60


async def _evalsha_calls(client: RedisCluster) -> dict[str, int]:
    calls = {}
    for primary in client.get_primaries():
        stats = await client.info("commandstats", target_nodes=primary)
        calls[primary.name] = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return calls


async def test_a_primary_killed_under_load_fails_over_to_its_replica_and_keeps_every_invariant(
        db, cluster, cluster_client, servers_for):
    """Replication is asynchronous: the promoted replica may lack holds its primary acknowledged. PostgreSQL's
    sold counter refuses any oversell meanwhile, and the app's watch of every primary's run id and replication
    id sees the failover and rebuilds the loaded products, so Redis agrees with PostgreSQL again (I2)."""
    before = await cache.identity(cluster_client)
    assert before.count("=") == 3, "one identity per primary"
    async with ordering_hot(servers_for(cluster.url), total_stock=100_000, workers=20) as (_, traffic):
        await traffic.reached(150)
        victim = _process(cluster, owner(cluster_client, "HOT"))
        victim.kill()
        killed_at = len(traffic.answers)
        await asyncio.wait_for(_created_after(traffic, killed_at, 100), timeout=60)  # served again
    traffic.assert_only({201, 503})
    traffic.assert_503s_are_problems()
    assert traffic.statuses()[503] > 0, "the failover was noticed"
    await asyncio.to_thread(cluster.wait_healthy)
    assert await _slot_owner_port(cluster_client) != victim.port, "the replica took the slot over"
    assert await cache.identity(cluster_client) != before
    await settled(db, cluster_client, traffic)


async def test_flushall_on_the_node_of_a_hot_product_rebuilds_it_and_spares_the_others(
        db, cluster, cluster_client, servers_for):
    hot_node = owner(cluster_client, "HOT")
    cold = next(pid for pid in (f"C{i}" for i in range(1000)) if owner(cluster_client, pid) != hot_node)

    async def flush_one_node() -> None:
        await cluster_client.flushall(target_nodes=hot_node)

    server = servers_for(cluster.url)
    async with burst_with_faults(server, flush_one_node, at=(100, 250)) as (c, traffic):
        cold_traffic = Traffic()
        await new_product(c, cold, total_stock=50)
        await burst(c, cold_traffic, product_id=cold, count=20)
        await flush_one_node()
        assert int(await cluster_client.hget(product_keys(cold).stock, "reserved")) == 20, "another node's product"
        traffic.assert_only({201, 409, 503})
        traffic.assert_503s_are_problems()
        assert sum(traffic.created.values()) <= 300
        r = (await c.get("/api/products/HOT")).json()  # its first use since the flush loads it
        assert r["reserved"] == await _pg_reserved(db, "HOT"), "rebuilt from PostgreSQL"
        traffic.created.update(cold_traffic.created)
        await settled(db, cluster_client, traffic)


async def test_a_slot_migrated_under_load_answers_503_or_201_and_loses_no_order(
        db, cluster, cluster_client, servers_for):
    async with ordering_hot(servers_for(cluster.url), total_stock=100_000, workers=20) as (_, traffic):
        await traffic.reached(100)
        src = owner(cluster_client, "HOT")
        dst = next(p for p in cluster_client.get_primaries() if p != src)
        slot = cluster_client.keyslot(product_keys("HOT").stock)
        moving_from = len(traffic.answers)
        moved = await migrate_slot(slot, src, dst, cluster_client.get_primaries(),
                                   between=lambda: traffic.reached(len(traffic.answers) + 2))
        assert moved >= 4, "the product's keys moved one by one while orders came in"
        moved_at = len(traffic.answers)
        await asyncio.wait_for(_created_after(traffic, moved_at, 100), timeout=60)
    traffic.assert_only({201, 503})
    traffic.assert_503s_are_problems()
    assert any(a.status == 201 for a in traffic.answers[moving_from:moved_at]) or moved_at == moving_from
    async with aioredis.Redis(port=dst.port) as direct:
        assert await direct.exists(product_keys("HOT").stock), "the product now lives on the other primary"
    await settled(db, cluster_client, traffic)


async def migrate_slot(slot: int, src: ClusterNode, dst: ClusterNode, primaries: list[ClusterNode], *,
                       between: Callable[[], Awaitable[object]]) -> int:
    """What `redis-cli --cluster reshard` does for one slot, a key at a time with `between()` awaited after
    each key, so clients meet ASK, TRYAGAIN and then MOVED. Returns how many keys moved."""
    admin = {p.name: aioredis.Redis(host=p.host, port=p.port) for p in primaries}
    try:
        src_id = (await admin[src.name].execute_command("CLUSTER", "MYID")).decode()
        dst_id = (await admin[dst.name].execute_command("CLUSTER", "MYID")).decode()
        await admin[dst.name].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        await admin[src.name].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while keys := await admin[src.name].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
            await admin[src.name].execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *keys)
            moved += 1
            await between()
        for name in (dst.name, src.name, *(n for n in admin if n not in (src.name, dst.name))):
            await admin[name].execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved
    finally:
        for client in admin.values():
            await client.aclose()


def _process(cluster: EmbeddedRedisCluster, node: ClusterNode) -> EmbeddedRedis:
    return next(n for n in cluster.nodes if n.port == node.port)


async def _slot_owner_port(client: RedisCluster) -> int:
    await client.aclose()  # forget the slot map: the next call reads the cluster's current one
    await client.initialize()
    return int(owner(client, "HOT").port)


async def _created_after(traffic: Traffic, index: int, n: int) -> None:
    while sum(1 for a in traffic.answers[index:] if a.status == 201) < n:
        await traffic.reached(len(traffic.answers) + 1)
