"""The invariant checker every stock test uses: I1 from PostgreSQL, I2 Redis against PostgreSQL, I3 orders."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg
import redis.asyncio as aioredis

from preorder.stock.service import keys


async def assert_invariants(
    db: asyncpg.Connection, redis: aioredis.Redis, *, created: Iterable[str] = (), settled: bool = True
) -> None:
    """I1 never oversold; I3 every 201 order is stored; with settled=True (traffic stopped, holds
    settled) also I2: Redis available == total - reserved computed from PostgreSQL, for every product."""
    rows = await db.fetch(
        """SELECT p.id, p.total_stock,
                  COALESCE(SUM(o.quantity) FILTER (WHERE o.status <> 'cancelled'), 0) AS reserved
           FROM products p LEFT JOIN orders o ON o.product_id = p.id GROUP BY p.id"""
    )
    for r in rows:
        assert r["reserved"] <= r["total_stock"], f"I1 oversold {r['id']}: {r['reserved']} > {r['total_stock']}"
        if not settled:
            continue
        total, reserved = await redis.hmget(keys(r["id"])[0], ["total", "reserved"])
        if total is None:
            continue  # not loaded: it is rebuilt from PostgreSQL on first use, so it cannot drift
        assert int(total) == r["total_stock"], f"I2 total drift on {r['id']}"
        assert int(reserved) == r["reserved"], f"I2 leak on {r['id']}: redis {int(reserved)} pg {r['reserved']}"
    ids = list(created)
    if ids:
        found = await db.fetchval("SELECT count(*) FROM orders WHERE id = ANY($1::uuid[])", ids)
        assert found == len(ids), f"I3 lost orders: {len(ids) - found} of {len(ids)} answered 201 are missing"
