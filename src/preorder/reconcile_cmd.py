"""`preorder reconcile [--fix]`: report drift between Redis and PostgreSQL per product; repair it with --fix."""

from __future__ import annotations

import sys

from preorder import cache, db
from preorder.settings import Settings
from preorder.stock.service import Stock
from preorder.workers.reconciler import compare, settle_all


async def reconcile(settings: Settings, *, fix: bool) -> int:
    if not settings.database_url or not settings.redis_url:
        print("PREORDER_DATABASE_URL and PREORDER_REDIS_URL must be set", file=sys.stderr)
        return 2
    pool, redis = await db.create_pool(settings), cache.create_redis(settings)
    try:
        stock = Stock(redis, pool)
        if fix:
            print(f"settled holds: {await settle_all(stock, orphan_hold_s=settings.orphan_hold_s)}")
        drifts = await compare(stock, orphan_hold_s=settings.orphan_hold_s)
        print(f"{'product':<24}{'pg total':>10}{'pg reserved':>13}{'redis total':>13}{'redis reserved':>16}"
              f"{'in flight':>11}  state")
        for d in drifts:
            state = "not loaded" if d.redis_total is None else ("DRIFT" if d.drifted else "ok")
            print(f"{d.product_id:<24}{d.pg_total:>10}{d.pg_reserved:>13}{_n(d.redis_total):>13}"
                  f"{_n(d.redis_reserved):>16}{d.unwritten:>11}  {state}")
        drifted = [d for d in drifts if d.drifted]
        if fix:
            for d in drifted:
                await stock.rebuild(d.product_id)
                print(f"rebuilt {d.product_id} from PostgreSQL")
            return 0
        print(f"{len(drifted)} of {len(drifts)} products drifted")
        return 1 if drifted else 0
    finally:
        await redis.aclose()
        await pool.close()


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)
