"""Settles Redis holds against PostgreSQL, and compares counters for `preorder reconcile`.

A hold is settled when its order is cancelled (stock back), shipped or completed (hold dropped), or when
no order row exists and the hold is older than orphan_hold_s (the process died between reserve and write;
the write deadline guarantees that order can no longer be written). A product whose Redis epoch is older than
PostgreSQL's is rebuilt: a loader committed its epoch but its load never landed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from preorder.stock import repository as stock_repo
from preorder.stock.service import Hold, Stock, keys

log = logging.getLogger("preorder.reconciler")


@dataclass
class Settled:
    released: int = 0
    dropped: int = 0
    orphans: int = 0
    young_unwritten: int = 0
    rebuilt: int = 0


async def settle_holds(stock: Stock, product_id: str, *, orphan_hold_s: float) -> Settled:
    done = Settled()
    async for holds in stock.hold_pages(product_id):
        if holds:
            await _settle_page(stock, product_id, holds, orphan_hold_s=orphan_hold_s, done=done)
    return done


async def _settle_page(
    stock: Stock, product_id: str, holds: list[Hold], *, orphan_hold_s: float, done: Settled
) -> None:
    now_ms = await _redis_now_ms(stock)
    statuses = await stock_repo.order_statuses(stock.pool, [h.order_id for h in holds])
    for h in holds:
        status = statuses.get(h.order_id)
        if status is None and now_ms - h.reserved_at_ms <= orphan_hold_s * 1000:
            done.young_unwritten += 1  # its write may still be running
        elif status is None:
            done.orphans += await _count(stock.release(product_id, h.order_id))
        elif status == "cancelled":
            done.released += await _count(stock.release(product_id, h.order_id))
        elif status in ("shipped", "completed"):
            done.dropped += await _count(stock.drop(product_id, h.order_id))


async def _count(settling: Any) -> int:
    return 1 if await settling else 0


async def _redis_now_ms(stock: Stock) -> int:
    # Redis's clock: the one the reserve script stamped the holds with.
    seconds, micros = await stock.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def settle_all(stock: Stock, *, orphan_hold_s: float) -> Settled:
    total = Settled()
    for r in await stock_repo.live_totals(stock.pool):
        pid = r["id"]
        epoch = await stock.redis.hget(keys(pid)[0], "epoch")
        if epoch is None:
            continue  # not loaded: the loader rebuilds it from PostgreSQL when it is next used
        if int(epoch) < r["stock_epoch"]:
            # The loader was killed (or lost Redis) between its commit and its load: until Redis is rebuilt,
            # the fence refuses every write. (A loader just between the two finds its load superseded: harmless.)
            await stock.rebuild(pid)
            total.rebuilt += 1
            continue
        s = await settle_holds(stock, pid, orphan_hold_s=orphan_hold_s)
        total.released += s.released
        total.dropped += s.dropped
        total.orphans += s.orphans
        total.young_unwritten += s.young_unwritten
    return total


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
    now_ms = await _redis_now_ms(stock)
    for r in await stock_repo.live_totals(stock.pool):
        pid = r["id"]
        total, reserved, epoch = await stock.redis.hmget(keys(pid)[0], ["total", "reserved", "epoch"])
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
