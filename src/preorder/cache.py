"""The Redis client, created once in the lifespan (the stock service and the order service hold it)."""

from __future__ import annotations

import redis.asyncio as aioredis
import redis.exceptions

from preorder.settings import Settings

# Errors that mean "Redis is not answering right now": the request gets 503, never 500.
UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


def create_redis(settings: Settings) -> aioredis.Redis:
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

