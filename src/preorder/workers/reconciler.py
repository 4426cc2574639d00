"""Settles Redis holds against PostgreSQL, and compares counters for `preorder reconcile`.

A hold is settled when its order is cancelled (stock back), shipped or completed (hold dropped), or when
no order row exists and the hold is older than orphan_hold_s (the process died between reserve and write;
the write deadline guarantees that order can no longer be written). A product whose Redis epoch is older than
PostgreSQL's is rebuilt: a loader committed its epoch but its load never landed.

Two passes find those holds. The full pass (settle_all) reads every hold of every product: its cost grows with
the live orders, so the background loop runs it at start and then rarely. The regular pass (settle_recent)
reads only what can have changed since the last one: the fresh holds old enough to be judged (reserve.lua
keeps them in a sorted set by time; each is matched with its order row once, then forgotten) and the orders
cancelled, shipped or completed since then. Its cost follows the order rate, not the live orders."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from preorder import metrics
from preorder.cache import clock_ms
from preorder.status import LIVE, RELEASED
from preorder.stock import repository as stock_repo
from preorder.stock.keys import product_keys
from preorder.stock.service import Stock

log = logging.getLogger("preorder.reconciler")


@dataclass
class Settled:
    released: int = 0
    dropped: int = 0
    orphans: int = 0
    young_unwritten: int = 0
    rebuilt: int = 0
    behind: int = 0  # products whose Redis counters were below PostgreSQL's: Redis went back in time

    def add(self, other: Settled) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


Reserved = tuple[uuid.UUID, int]  # a hold's order id and its reservation time (Redis clock, ms)


async def settle_holds(stock: Stock, product_id: str, *, orphan_hold_s: float) -> Settled:
    """Every hold of the product (the full pass)."""
    done = Settled()
    async for holds in stock.hold_pages(product_id):
        if holds:
            reserved = [(h.order_id, h.reserved_at_ms) for h in holds]
            await _settle_page(stock, product_id, reserved, orphan_hold_s=orphan_hold_s, done=done)
    return done


async def settle_fresh(stock: Stock, product_id: str, *, orphan_hold_s: float) -> Settled:
    """The fresh holds old enough to be judged: each has its order row by now, or never will (an orphan). Most are
    live orders keeping their holds: only the others come back from PostgreSQL."""
    done = Settled()
    judged_before_ms = await _redis_now_ms(stock, product_id) - int(orphan_hold_s * 1000)
    async for page in stock.fresh_pages(product_id, reserved_before_ms=judged_before_ms):
        for r in await stock_repo.not_live(stock.pool, b",".join(page).decode()):
            await _settle(stock, product_id, r["id"], r["status"], done)
        await stock.forget_fresh(product_id, page)  # settled: matched or freed
    return done


async def settle_changed(stock: Stock, *, since: datetime) -> Settled:
    """Holds of the orders cancelled, shipped or completed since then whose settling did not happen (the
    process died between the status change and the Redis call)."""
    done = Settled()
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        rows = await stock_repo.settled_since(stock.pool, since, after=after)
        if not rows:
            return done
        by_product: dict[str, dict[uuid.UUID, str]] = defaultdict(dict)
        for r in rows:
            by_product[r["product_id"]][r["id"]] = r["status"]
        for product_id, statuses in by_product.items():
            for order_id in await stock.holding(product_id, list(statuses)):
                await _settle(stock, product_id, order_id, statuses[order_id], done)
        after = (rows[-1]["updated_at"], rows[-1]["id"])


async def _settle_page(
    stock: Stock, product_id: str, holds: list[Reserved], *, orphan_hold_s: float, done: Settled
) -> None:
    now_ms = await _redis_now_ms(stock, product_id)
    statuses = await stock_repo.order_statuses(stock.pool, [order_id for order_id, _ in holds])
    for order_id, reserved_at_ms in holds:
        status = statuses.get(order_id)
        if status is None and now_ms - reserved_at_ms <= orphan_hold_s * 1000:
            done.young_unwritten += 1  # its write may still be running
        elif status not in LIVE:
            await _settle(stock, product_id, order_id, status, done)


async def _settle(stock: Stock, product_id: str, order_id: uuid.UUID, status: str | None, done: Settled) -> None:
    """A hold whose order is not live: no row (an orphan, old enough to judge), stock given back, or shipped."""
    if status is None:
        done.orphans += await _count(stock.release(product_id, order_id))
    elif status in RELEASED:
        done.released += await _count(stock.release(product_id, order_id))
    else:
        done.dropped += await _count(stock.drop(product_id, order_id))


async def _count(settling: Any) -> int:
    return 1 if await settling else 0


async def _redis_now_ms(stock: Stock, product_id: str) -> int:
    # Redis's clock, on the node that holds the product (on a cluster): the one reserve.lua stamped its holds with.
    return await clock_ms(stock.redis, product_keys(product_id).stock)


async def settle_all(stock: Stock, *, orphan_hold_s: float) -> Settled:
    """The full pass: every hold of every loaded product."""
    total = Settled()
    for loaded in await _current_products(stock, total):
        total.add(await settle_holds(stock, loaded.product_id, orphan_hold_s=orphan_hold_s))
        total.add(await settle_fresh(stock, loaded.product_id, orphan_hold_s=orphan_hold_s))
    return total


async def settle_recent(stock: Stock, *, since: datetime, orphan_hold_s: float) -> Settled:
    """The regular pass: fresh holds old enough to be judged, and orders settled since `since`. Only products
    with fresh holds are looked into: a store of many products on sale but few selling costs a few pipelines."""
    total = Settled()
    for loaded in await _current_products(stock, total):
        if loaded.fresh:
            total.add(await settle_fresh(stock, loaded.product_id, orphan_hold_s=orphan_hold_s))
    total.add(await settle_changed(stock, since=since))
    return total


@dataclass(frozen=True, slots=True)
class Loaded:
    product_id: str
    fresh: int  # holds in its fresh set


async def _current_products(stock: Stock, done: Settled, *, page: int = 500) -> list[Loaded]:
    """The products loaded in Redis at PostgreSQL's epoch and not behind it; the others are rebuilt. Their
    counters are read a page of products per pipeline: one round trip per page, not per product (measured: a
    round trip per product made the pass cost ~50 us of every create's CPU, in bursts, with 1,000 products)."""
    current = []
    products = await stock_repo.epochs(stock.pool)
    for start in range(0, len(products), page):
        rows = products[start:start + page]
        pipe = stock.redis.pipeline(transaction=False)
        for r in rows:
            keys = product_keys(r["id"])
            pipe.hmget(keys.stock, ["epoch", "reserved"])
            pipe.zcard(keys.fresh)
        answers = await pipe.execute()
        for i, r in enumerate(rows):
            pid = r["id"]
            (epoch, reserved), fresh = answers[2 * i], answers[2 * i + 1]
            if epoch is None or reserved is None:
                continue  # not loaded: the loader rebuilds it from PostgreSQL when it is next used
            if int(epoch) < r["stock_epoch"]:
                # The loader was killed (or lost Redis) between its commit and its load: until Redis is rebuilt,
                # the fence refuses every write. (A loader just between the two finds its load superseded.)
                await stock.rebuild(pid)
                done.rebuilt += 1
            elif await _behind(stock, pid, redis_reserved=int(reserved), sold_before=r["sold"]):
                await stock.rebuild(pid)
                done.behind += 1
            else:
                current.append(Loaded(pid, int(fresh)))
    return current


async def _behind(stock: Stock, product_id: str, *, redis_reserved: int, sold_before: int) -> bool:
    """Redis reserves before PostgreSQL writes, and PostgreSQL cancels before Redis releases, so Redis's
    `reserved` is never below PostgreSQL's `sold` at any one instant, unless Redis lost acknowledged writes.
    The two are read at different moments, so PostgreSQL is read on both sides of the Redis read and Redis must
    be below both: only a cancel and a create of this product landing in the milliseconds between the reads can
    still raise a false alarm, and a false alarm costs one rebuild."""
    if redis_reserved >= sold_before:
        return False
    if redis_reserved >= await stock_repo.sold(stock.pool, product_id):
        return False
    log.error("Redis holds %d units of %s, PostgreSQL's orders %d: Redis went back in time, rebuilding",
              redis_reserved, product_id, sold_before)
    return True


class RedisWatch:
    """Notices that Redis is another server, or the same one restarted or promoted (its run id or replication id
    changed): it may have come back from a snapshot or an asynchronous replica, with acknowledged holds missing.
    Every loaded product is then rebuilt from PostgreSQL at once, without waiting for a write to be refused."""

    def __init__(self, stock: Stock) -> None:
        self.stock = stock
        self._seen: str | None = None

    async def check(self) -> int:
        """How many products were rebuilt (0 when Redis is the one seen last time)."""
        now = await self.stock.identity()
        changed, self._seen = self._seen is not None and now != self._seen, now
        if not changed:
            return 0
        log.error("Redis changed identity (restarted, restored or failed over): rebuilding every loaded product")
        metrics.REDIS_BEHIND.labels("identity").inc()
        rebuilt = 0
        for r in await stock_repo.epochs(self.stock.pool):
            if await self.stock.redis.exists(product_keys(r["id"]).stock):
                await self.stock.rebuild(r["id"])
                rebuilt += 1
        return rebuilt


class Reconciler:
    """What the background loop runs: the full pass first and every full_interval_s, the regular pass between.
    The regular pass looks back to the start of the previous pass, less a margin longer than any statement can
    run (orphan_hold_s), so a status change committed late still falls inside it."""

    def __init__(self, stock: Stock, *, orphan_hold_s: float, full_interval_s: float) -> None:
        self.stock, self.orphan_hold_s, self.full_interval_s = stock, orphan_hold_s, full_interval_s
        self._since: datetime | None = None
        self._next_full = 0.0

    async def run(self) -> Settled:
        started = await stock_repo.database_now(self.stock.pool)
        if self._since is None or time.monotonic() >= self._next_full:
            done = await settle_all(self.stock, orphan_hold_s=self.orphan_hold_s)
            self._next_full = time.monotonic() + self.full_interval_s
            metrics.RECONCILER_PASSES.labels("full").inc()
        else:
            since = self._since - timedelta(seconds=self.orphan_hold_s)
            done = await settle_recent(self.stock, since=since, orphan_hold_s=self.orphan_hold_s)
            metrics.RECONCILER_PASSES.labels("regular").inc()
        self._since = started
        return done


@dataclass
class Drift:
    product_id: str
    pg_total: int
    pg_reserved: int
    redis_total: int | None
    redis_reserved: int | None
    unwritten: int  # quantity held by young holds without an order: their write may still be running
    notes: list[str] = field(default_factory=list)
    stale_epoch: bool = False  # Redis holds figures older than PostgreSQL's epoch: every write is fenced out

    @property
    def drifted(self) -> bool:
        if self.redis_total is None or self.redis_reserved is None:
            return False  # not loaded: nothing can drift, it is rebuilt on first use
        return (self.stale_epoch or self.redis_total != self.pg_total
                or self.redis_reserved - self.unwritten != self.pg_reserved)


async def compare(stock: Stock, *, orphan_hold_s: float) -> list[Drift]:
    out = []
    for r in await stock_repo.live_totals(stock.pool):
        pid = r["id"]
        now_ms = await _redis_now_ms(stock, pid)
        total, reserved, epoch = await stock.redis.hmget(product_keys(pid).stock, ["total", "reserved", "epoch"])
        holds = await stock.holds(pid) if total is not None else []
        statuses = await stock_repo.order_statuses(stock.pool, [h.order_id for h in holds])
        # An orphan hold (older than orphan_hold_s, no order) can no longer be written: it is drift, a leak.
        unwritten = sum(h.quantity for h in holds
                        if h.order_id not in statuses and now_ms - h.reserved_at_ms <= orphan_hold_s * 1000)
        out.append(Drift(pid, r["total_stock"], int(r["reserved"]),
                         int(total) if total is not None else None,
                         int(reserved) if reserved is not None else None, unwritten,
                         stale_epoch=epoch is not None and int(epoch) < r["stock_epoch"]))
    return out
