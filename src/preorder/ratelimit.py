"""Order-creation rate limits per customer and per client address, counted in Redis (the `limits` library's
fixed windows) so every app process shares them."""

from __future__ import annotations

import math
import time
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter

from preorder.auth import CurrentUser
from preorder.errors import RateLimited
from preorder.settings import Settings


class OrderRateLimit:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        # The app's own pool: no second set of connections, and Redis errors surface as redis-py's (503).
        storage = RedisStorage(
            "async+" + settings.redis_url, implementation="redispy",
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]  # limits types options as scalars
            key_prefix="po:rl",
        )
        self._limiter = FixedWindowRateLimiter(storage)
        window = settings.rate_limit_window_s
        self._per_client = RateLimitItemPerSecond(settings.rate_limit_per_client, window)
        self._per_user = RateLimitItemPerSecond(settings.rate_limit_per_user, window)

    async def check(self, *, user_id: str, client: str) -> None:
        for item, who in ((self._per_client, f"client:{client}"), (self._per_user, f"user:{user_id}")):
            if not await self._limiter.hit(item, "create", who):
                stats = await self._limiter.get_window_stats(item, "create", who)
                raise RateLimited(retry_after=max(1, math.ceil(stats.reset_time - time.time())))


async def limit_order_creation(request: Request, principal: CurrentUser) -> None:
    limiter: OrderRateLimit = request.app.state.ratelimit
    client = request.client.host if request.client else "unknown"
    await limiter.check(user_id=principal.sub, client=client)


OrderCreationLimit = Annotated[None, Depends(limit_order_creation)]
