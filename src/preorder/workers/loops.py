"""The background loop each app process runs. Every step is safe to run in many processes at once."""

from __future__ import annotations

import asyncio
import logging
import time

from preorder import metrics
from preorder.orders import repository as order_repo
from preorder.orders.service import Orders
from preorder.workers.reconciler import Reconciler, RedisWatch, Settled
from preorder.workers.unpaid import recount_unpaid_once

log = logging.getLogger("preorder.workers")


async def run_once(orders: Orders, reconciler: Reconciler | None, watch: RedisWatch | None = None) -> None:
    if watch is not None:
        await watch.check()  # first: a Redis that went back in time is rebuilt before anything reads it
    expired = await orders.expire_all_due()
    metrics.SWEEPER_RUNS.inc()
    if expired:
        log.info("cancelled %d unpaid orders past their payment window", expired)
    forfeited = await orders.forfeit_all_due()
    if forfeited:
        log.info("forfeited %d deposit-paid orders past their balance window", forfeited)
    if reconciler is not None:
        settled = await reconciler.run()
        _count(settled)
        if settled.released or settled.dropped or settled.orphans or settled.rebuilt or settled.behind:
            log.warning("settled holds: %s", settled)
        await order_repo.purge_idempotency(orders.pool, limit=1000)


def _count(settled: Settled) -> None:
    """Every hold the reconciler settles, and every stale product it rebuilds, is Redis and PostgreSQL
    disagreeing: a process died between two steps, or a Redis step failed after a commit."""
    for action in ("released", "dropped", "orphans"):
        metrics.RECONCILER_HOLDS.labels(action).inc(getattr(settled, action))
    metrics.RECONCILER_DRIFT.inc(settled.released + settled.dropped + settled.orphans + settled.rebuilt
                                 + settled.behind)
    metrics.REDIS_BEHIND.labels("counters").inc(settled.behind)


async def run_forever(orders: Orders) -> None:
    settings = orders.settings
    reconciler = Reconciler(orders.stock, orphan_hold_s=settings.orphan_hold_s,
                            full_interval_s=settings.reconcile_full_interval_s)
    watch = RedisWatch(orders.stock)
    next_reconcile = next_recount = 0.0
    while True:
        try:
            due = time.monotonic() >= next_reconcile
            await run_once(orders, reconciler if due else None, watch)
            if due:
                next_reconcile = time.monotonic() + orders.settings.reconcile_interval_s
            if time.monotonic() >= next_recount:
                every_s = orders.settings.unpaid_recount_interval_s
                if fixed := await recount_unpaid_once(orders, every_s=every_s):
                    log.warning("recounted %d customers' unpaid units from PostgreSQL", fixed)
                next_recount = time.monotonic() + every_s
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a dependency is down: try again next round, never die
            metrics.BACKGROUND_FAILURES.inc()
            log.warning("background round failed", exc_info=exc)
        await asyncio.sleep(orders.settings.sweep_interval_s)
