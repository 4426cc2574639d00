"""Stock in Redis: reserve, release, drop, rebuild from PostgreSQL. Every key of a product shares one
hash tag ({product_id}), so the scripts run unchanged on Redis Cluster."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn

from redis.exceptions import ResponseError

from preorder import cache, metrics
from preorder.cache import RedisClient
from preorder.db import PgConn, PgPool
from preorder.errors import (
    NotFound,
    OutOfStock,
    PresaleEnded,
    PresaleNotStarted,
    RateLimited,
    SoldOutMark,
    Unavailable,
    UserLimitReached,
)
from preorder.status import LIVE
from preorder.stock import repository as repo
from preorder.stock.batching import ScriptBatcher
from preorder.stock.customers import CustomerLimits, CustomerRules
from preorder.stock.keys import product_keys
from preorder.stock.scripts import script_text

log = logging.getLogger("preorder.stock")
RELEASE_CHUNK = 500  # order ids per release_many.lua call
_script = script_text


def _ms(at: datetime | None) -> int:
    return int(at.timestamp() * 1000) if at else 0


@dataclass(frozen=True, slots=True)
class Reservation:
    epoch: int
    reserved_at_ms: int
    available: int


@dataclass(frozen=True, slots=True)
class Hold:
    order_id: uuid.UUID
    quantity: int
    user_id: str
    reserved_at_ms: int


@dataclass(frozen=True, slots=True)
class Levels:
    total: int
    reserved: int
    epoch: int

    @property
    def available(self) -> int:
        return self.total - self.reserved


def parse_hold(order_id: bytes | str, value: bytes | str) -> Hold:
    raw = value.decode() if isinstance(value, bytes) else value
    qty, rest = raw.split(":", 1)
    user, at = rest.rsplit(":", 1)
    oid = order_id.decode() if isinstance(order_id, bytes) else order_id
    return Hold(uuid.UUID(oid), int(qty), user, int(at))


@dataclass(frozen=True, slots=True)
class Ask:
    """One customer's request for stock."""

    product_id: str
    order_id: uuid.UUID
    quantity: int
    user_id: str
    client: str


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Order creates allowed per window, per customer and per client address, counted per product: the counters
    share the product's hash tag, so the check runs inside the reserve script (no extra round trip, and the
    script still runs unchanged on Redis Cluster). Measured: a separate limiter (the `limits` library, two
    calls) cost more CPU than the reservation itself."""

    per_user: int = 1_000_000
    per_client: int = 1_000_000
    window_ms: int = 1000

    @property
    def args(self) -> tuple[int, int, int]:
        return self.per_user, self.per_client, self.window_ms


class ExpiringMarks:
    """Product ids this process saw refused (sold out, or unknown) in the last ttl_s, at most max_size of them.
    A mark only ever refuses, never grants stock, so the worst a stale mark does is refuse for ttl_s after the
    product changed elsewhere; in exchange those refusals cost no Redis call at all. Bounded: a flood of made-up
    ids drops expired marks first, then the oldest, so memory stays flat whatever the ids."""

    def __init__(self, ttl_s: float, *, max_size: int = 10_000) -> None:
        self._ttl_s, self._max_size = ttl_s, max_size
        self._until: dict[str, float] = {}

    def refuses(self, product_id: str) -> bool:
        until = self._until.get(product_id)
        return until is not None and until > time.monotonic()

    def mark(self, product_id: str) -> None:
        now = time.monotonic()
        if len(self._until) >= self._max_size and product_id not in self._until:
            self._until = {k: t for k, t in self._until.items() if t > now}
            while len(self._until) >= self._max_size:  # all live: forget the oldest (dicts keep insertion order)
                del self._until[next(iter(self._until))]
        self._until[product_id] = now + self._ttl_s

    def clear(self, product_id: str) -> None:
        self._until.pop(product_id, None)

    def __len__(self) -> int:
        return len(self._until)


class NotLoaded(Exception):
    """Redis holds no counters for this product (never loaded, or its data was lost)."""


@dataclass(frozen=True, slots=True)
class StockRules:
    rate: RateLimits = field(default_factory=RateLimits)
    customers: CustomerRules = field(default_factory=CustomerRules)
    sold_out_ttl_s: float = 0.2
    # How long an unknown product id is refused without asking PostgreSQL again (in this process, and by a
    # marker in Redis that every process sees). Creating the product deletes both at once in the creating
    # process; another process may still refuse it for up to this long from its own memory.
    unknown_ttl_s: float = 5.0


class Stock:
    def __init__(self, redis: RedisClient, pool: PgPool, rules: StockRules | None = None) -> None:
        self.redis = redis
        self.pool = pool
        rules = rules or StockRules()
        self.rate, self._unknown_ttl_ms = rules.rate, int(rules.unknown_ttl_s * 1000)
        self.sold_out = ExpiringMarks(rules.sold_out_ttl_s)
        self.unknown = ExpiringMarks(rules.unknown_ttl_s)
        self._reserve = ScriptBatcher(redis, redis.register_script(_script("reserve.lua")))
        self.customers = CustomerLimits(redis, self._reserve, rules.customers)
        self._settle = redis.register_script(_script("release.lua"))
        self._settle_many = redis.register_script(_script("release_many.lua"))
        self._load = redis.register_script(_script("load.lua"))
        # A lock lives only while a load of its product runs or waits: an unknown id leaves nothing behind.
        self._loading: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._behind: dict[str, asyncio.Task[None]] = {}  # products being rebuilt because Redis fell behind
        self.rebuilds_behind = 0  # how often Redis was found behind PostgreSQL (went back in time)

    async def reserve(self, ask: Ask, *, before_loading: Callable[[], Awaitable[None]] | None = None
                      ) -> Reservation:
        """Reserve, loading the product from PostgreSQL first if Redis has no counters for it. The in-process
        refusals are the caller's to check first (refuse_from_memory), before it spends work on the ask.
        `before_loading` runs before any PostgreSQL work (the customer's admission: a refused one costs none)."""
        for _ in range(3):
            try:
                return await self._try_reserve(ask)
            except NotLoaded:
                if before_loading is not None:
                    await before_loading()
                await self.ensure_loaded(ask.product_id)
        raise Unavailable("Stock is being rebuilt; retry shortly")

    def refuse_from_memory(self, product_id: str) -> None:
        """The in-process refusals: call it before any other work a sold-out or unknown answer would waste."""
        if self.sold_out.refuses(product_id):
            raise SoldOutMark("Sold out", available=0)
        if self.unknown.refuses(product_id):
            raise NotFound(f"Unknown product {product_id}")

    async def _try_reserve(self, ask: Ask) -> Reservation:
        k = product_keys(ask.product_id)
        try:
            answer = await self._reserve(
                (k.reserve_head, self.rate.args),
                keys=[k.rate_user(ask.user_id), k.rate_client(ask.client)],
                args=[str(ask.order_id), ask.quantity, ask.user_id],
            )
        except ResponseError as exc:  # the whole call failed inside Redis: nothing of it was written
            log.error("reserve script failed for %s: %s", ask.product_id, exc)
            raise Unavailable("Stock could not be reserved; retry") from None
        code = answer[0]
        if code == b"OK":
            return Reservation(int(answer[1]), int(answer[2]), int(answer[3]))
        return self._refusal(ask.product_id, code.decode(), answer)

    def _refusal(self, product_id: str, code: str, answer: list[Any]) -> NoReturn:
        if code == "NOT_LOADED":
            raise NotLoaded(product_id)
        if code == "UNKNOWN":  # another loader found no such product a moment ago
            self.unknown.mark(product_id)
            raise NotFound(f"Unknown product {product_id}")
        if code == "OUT_OF_STOCK":
            available = int(answer[1])
            if available == 0:
                self.sold_out.mark(product_id)
            raise OutOfStock(f"Only {available} left", available=available)
        if code == "RATE_LIMITED":
            raise RateLimited(retry_after=max(1, math.ceil(int(answer[1]) / 1000)))
        if code == "USER_LIMIT":
            remaining = max(int(answer[1]), 0)
            raise UserLimitReached(f"You may order {remaining} more of this product", remaining=remaining)
        if code == "NOT_STARTED":
            raise PresaleNotStarted("The presale has not started")
        if code == "ENDED":
            raise PresaleEnded("The presale has ended")
        if code == "ERROR":  # this ask alone raised inside the script (the others of its call ran)
            log.error("reserve script failed for %s: %s", product_id, answer[1])
            raise Unavailable("Stock could not be reserved; retry")
        raise Unavailable(f"Reservation refused: {code}")  # DUPLICATE: a fresh uuid7 collided; retryable

    async def release(self, product_id: str, order_id: uuid.UUID) -> int:
        """Give back what the order's hold still holds; a second call gives back nothing."""
        given = int(await self._settle(keys=product_keys(product_id).scripts, args=[str(order_id), "release"]))
        if given:
            self.sold_out.clear(product_id)
        return given

    async def release_many(self, product_id: str, order_ids: Sequence[uuid.UUID], *, chunk: int = RELEASE_CHUNK
                           ) -> int:
        """release() for many orders of one product: one script call per `chunk` orders (each call holds Redis
        for well under a millisecond at the default). Returns the units given back."""
        given = 0
        keys = product_keys(product_id).scripts
        for start in range(0, len(order_ids), chunk):
            answer = await self._settle_many(keys=keys, args=[str(o) for o in order_ids[start:start + chunk]])
            given += int(answer[0])
            if len(answer) > 2:
                log.error("left %d malformed holds of %s for an operator: %s", len(answer) - 2, product_id,
                          [m.decode() for m in answer[2:]])
        if given:
            self.sold_out.clear(product_id)
        return given

    async def drop(self, product_id: str, order_id: uuid.UUID) -> int:
        """The order shipped: forget its hold, keep its stock sold."""
        return int(await self._settle(keys=product_keys(product_id).scripts, args=[str(order_id), "drop"]))

    async def levels(self, product_id: str) -> Levels:
        for _ in range(3):
            stock_key = product_keys(product_id).stock
            total, reserved, epoch = await self.redis.hmget(stock_key, ["total", "reserved", "epoch"])
            if total is not None and reserved is not None and epoch is not None:  # load.lua writes all three
                return Levels(int(total), int(reserved), int(epoch))
            await self.ensure_loaded(product_id)
        raise Unavailable("Stock is being rebuilt; retry shortly")

    async def hold_pages(self, product_id: str, *, size: int = 1000) -> AsyncIterator[list[Hold]]:
        """The product's holds a page at a time, so a pass over many live orders holds one page in memory.
        (HSCAN may repeat a hold across pages: settling is idempotent.)"""
        cursor = 0
        while True:
            cursor, page = await self.redis.hscan(product_keys(product_id).holds, cursor, count=size)
            assert isinstance(page, dict)  # HSCAN without NOVALUES answers field -> value
            yield [parse_hold(oid, value) for oid, value in page.items()]
            if cursor == 0:
                return

    async def fresh_pages(self, product_id: str, *, reserved_before_ms: int, size: int = 1000
                          ) -> AsyncIterator[list[bytes]]:
        """The order ids (as Redis keeps them) of the fresh holds reserved before the given time, oldest first, a
        page at a time. The caller forgets each page once it has settled it (forget_fresh): the next page starts
        after it."""
        while True:
            page: list[Any] = await self.redis.zrangebyscore(
                product_keys(product_id).fresh, "-inf", reserved_before_ms, start=0, num=size)
            if not page:
                return
            yield page
            if len(page) < size:
                return

    async def forget_fresh(self, product_id: str, members: list[bytes]) -> None:
        if members:
            await self.redis.zrem(product_keys(product_id).fresh, *members)

    async def holding(self, product_id: str, order_ids: list[uuid.UUID]) -> list[uuid.UUID]:
        """Which of these orders still hold stock in Redis."""
        if not order_ids:
            return []
        found = await self.redis.hmget(product_keys(product_id).holds, [str(o) for o in order_ids])
        return [o for o, hold in zip(order_ids, found, strict=True) if hold is not None]

    async def holds(self, product_id: str) -> list[Hold]:
        found = []
        async for oid, value in self.redis.hscan_iter(product_keys(product_id).holds, count=1000):
            found.append(parse_hold(oid, value))
        return found

    async def identity(self) -> str:
        """Which Redis this is: its run id (new at every start) and replication id (new at every promotion); on
        a cluster, every primary's."""
        return await cache.identity(self.redis)

    def rebuild_behind(self, product_id: str) -> None:
        """Redis granted stock that PostgreSQL has sold: its counters went back in time (a replica promoted, a
        restore, a lost AOF second). Rebuild the product in the background, once however many writes saw it."""
        if product_id in self._behind:
            return
        self.rebuilds_behind += 1
        metrics.REDIS_BEHIND.labels("write_refused").inc()
        log.error("Redis is behind PostgreSQL on %s (it went back in time): rebuilding it now", product_id)
        task = asyncio.create_task(self._rebuild_logged(product_id))
        self._behind[product_id] = task
        task.add_done_callback(lambda _: self._behind.pop(product_id, None))

    async def _rebuild_logged(self, product_id: str) -> None:
        try:
            await self.rebuild(product_id)
        except Exception:  # the reconciler's pass finds it again
            log.exception("rebuilding %s failed", product_id)

    async def ensure_loaded(self, product_id: str) -> None:
        """Fail closed while exactly one loader (per process, and across processes by the row lock) rebuilds.
        A product PostgreSQL does not know is remembered as unknown, here and in Redis, for unknown_ttl_s."""
        lock = self._loading.get(product_id)
        if lock is None:
            lock = self._loading[product_id] = asyncio.Lock()
        async with lock:
            if await self.redis.exists(product_keys(product_id).stock):
                return
            try:
                await self.rebuild(product_id, only_if_missing=True)
            except NotFound:
                self.unknown.mark(product_id)
                await self.redis.set(product_keys(product_id).absent, 1, px=self._unknown_ttl_ms)
                raise

    async def forget_unknown(self, product_id: str) -> None:
        """The product was just created: this process and the Redis marker stop calling it unknown."""
        self.unknown.clear(product_id)
        await self.redis.delete(product_keys(product_id).absent)

    async def rebuild(
        self,
        product_id: str,
        *,
        only_if_missing: bool = False,
        apply: Callable[[PgConn], Awaitable[None]] | None = None,
    ) -> None:
        """Bump the product's epoch and reload Redis from PostgreSQL. `apply` changes the product in the
        same transaction, so no order reserved against the old figures can commit after the change."""
        snap = await self._bump_and_snapshot(product_id, only_if_missing=only_if_missing, apply=apply)
        if snap is not None:
            metrics.REBUILDS.inc()
        self.sold_out.clear(product_id)  # the product may have stock again (e.g. a PATCH raised it)
        for _ in range(3):  # each further round needs yet another loader racing this one: rare, so bounded
            if snap is None or await self._load_is_newest(product_id, snap):
                return
            # Our snapshot landed although another loader has bumped the epoch since: Redis lost that loader's
            # load (or it has yet to run). An older snapshot must not stay: it lacks the orders written since,
            # and the fence would refuse every write reserved against it.
            snap = await self._bump_and_snapshot(product_id)

    async def _bump_and_snapshot(
        self,
        product_id: str,
        *,
        only_if_missing: bool = False,
        apply: Callable[[PgConn], Awaitable[None]] | None = None,
    ) -> repo.Snapshot | None:
        async with self.pool.acquire() as conn, conn.transaction():
            if await repo.lock_product(conn, product_id) is None:
                raise NotFound(f"Unknown product {product_id}")
            # Checked again under the lock: another process may have loaded it while we waited.
            if only_if_missing and await self.redis.exists(product_keys(product_id).stock):
                return None
            if apply is not None:
                await apply(conn)
            return await repo.bump_epoch_and_snapshot(conn, product_id)

    async def _load_is_newest(self, product_id: str, snap: repo.Snapshot) -> bool:
        # Called once the snapshot is committed: an order write that reserved against the old Redis now fails
        # its epoch fence. load.lua ignores a snapshot older than the one Redis holds (answers 0).
        loaded = await self._load(keys=product_keys(product_id).scripts, args=self._load_args(snap))
        return not loaded or await repo.stock_epoch(self.pool, product_id) == snap.epoch

    @staticmethod
    def _load_args(snap: repo.Snapshot) -> list[Any]:
        holds: list[Any] = []
        per_user: dict[str, int] = defaultdict(int)
        for o in snap.live:
            per_user[o["user_id"]] += o["quantity"]
            if o["status"] in LIVE:
                holds += [str(o["id"]), f"{o['quantity']}:{o['user_id']}:{_ms(o['created_at'])}"]
        head = [snap.epoch, snap.total, sum(per_user.values()), _ms(snap.starts_at), _ms(snap.ends_at)]
        args: list[Any] = [*head, snap.per_user_limit or 0, len(holds) // 2, *holds]
        for user, count in per_user.items():
            args += [user, count]
        return args
