"""The Redis client, created once in the lifespan (the stock service and the order service hold it).

`PREORDER_REDIS_URL` names one Redis (`redis://host:port/db`) or a Redis Cluster
(`redis+cluster://[user:password@]host:port[,host:port...]`: any reachable nodes; the client discovers the rest).
The code is written against what both clients share (RedisClient); the places that must know which it is
(whose clock a script stamped with, which servers hold the data) are `clock_ms` and `identity` here."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster

from preorder.settings import Settings

RedisClient = aioredis.Redis | RedisCluster

CLUSTER_SCHEME = "redis+cluster"

# Errors that mean "Redis is not answering right now": the request gets 503, never 500. On a cluster that
# includes a slot without a serving primary (failover in progress), a slot in migration whose multi-key script
# still gets TRYAGAIN after the client's retries (ClusterError "TTL exhausted"), and a node with no free
# connection (MaxConnectionsError, a ConnectionError).
UNAVAILABLE = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
    redis.exceptions.ClusterError, redis.exceptions.TryAgainError, redis.exceptions.RedisClusterException,
)


def is_cluster_url(url: str) -> bool:
    return url.startswith(f"{CLUSTER_SCHEME}://")


def create_redis(settings: Settings) -> RedisClient:
    if is_cluster_url(settings.redis_url):
        return _create_cluster(settings)
    # A blocking pool: a burst waits (bounded by the timeout) for a connection instead of failing at once. The
    # wait is as short as a command's: with Redis hung, every connection is stuck and a request must not queue.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_max,
        timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


# The asyncio cluster client cannot wait for a free connection (no blocking pool): past its per-node cap a call
# fails at once with MaxConnectionsError (503). Its cap is therefore a ceiling against runaway, not a queue:
# 500 concurrent creates in one process hit 64 on a node (tests/test_stock_concurrency.py on a cluster).
CLUSTER_MIN_NODE_CONNECTIONS = 512


def _create_cluster(settings: Settings) -> RedisCluster:
    """One pool per node, of max(redis_pool_max, CLUSTER_MIN_NODE_CONNECTIONS) connections."""
    parts = urlsplit(settings.redis_url)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    nodes = [ClusterNode(host, int(port)) for host, port in (h.rsplit(":", 1) for h in hosts.split(",") if h)]
    if not nodes:
        raise ValueError(f"{CLUSTER_SCHEME}:// needs at least one host:port")
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    username, _, password = userinfo.partition(":")
    return RedisCluster(
        startup_nodes=nodes,
        username=unquote(username) or None,
        password=unquote(password) or None,
        max_connections=max(settings.redis_pool_max, CLUSTER_MIN_NODE_CONNECTIONS),
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
        # A MOVED answer (a slot moved) patches that slot's owner in the client's map; the default (a full
        # refresh every 5th MOVED) closes every node's connections, and requests still using one of them
        # then fail with transport errors outside redis-py's error types (500s, seen in the slot-migration
        # test; redis-py issue #4287). Connection errors and CLUSTERDOWN still refresh the whole map.
        reinitialize_steps=0,
    )


async def clock_ms(redis: RedisClient, key: str) -> int:
    """Redis's clock, in ms, on the node that owns `key`: the clock a script on that key stamps with. (Cluster
    nodes' clocks differ; TIME without a target would answer from an arbitrary node.)"""
    if isinstance(redis, RedisCluster):
        await redis.initialize()  # the slot map (a no-op once known, unless an error marked it stale)
        seconds, micros = await redis.time(target_nodes=redis.get_node_from_key(key))
    else:
        seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def identity(redis: RedisClient) -> str:
    """Which Redis servers hold the data: each one's run id (new at every start) and replication id (new at every
    promotion). On a cluster, every primary's, so a failover of any primary changes it."""
    if not isinstance(redis, RedisCluster):
        return await _node_identity(redis)
    await redis.initialize()  # a no-op unless an error (a node down) marked the topology for a refresh
    primaries = sorted(redis.get_primaries(), key=lambda node: node.name)
    return ",".join([f"{node.name}={await _node_identity(redis, node)}" for node in primaries])


async def _node_identity(redis: RedisClient, node: ClusterNode | None = None) -> str:
    target = {} if node is None else {"target_nodes": node}
    server = await redis.info("server", **target)
    replication = await redis.info("replication", **target)
    return f"{server['run_id']}/{replication['master_replid']}"
