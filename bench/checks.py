"""After the load: the invariants of DESIGN.md section 2, for this run's products only.

- I3 (no lost order): orders in PostgreSQL >= 201s wrk received. They can exceed them by at most the
  requests in flight when each wrk run stopped (wrk drops those connections; the server finishes the
  order anyway), i.e. connections x runs. Anything outside [0, that bound] fails.
- I1 (no oversell): non-cancelled quantity in PostgreSQL <= total_stock, per product.
- I2 (no leak): Redis reserved == the non-cancelled quantity in PostgreSQL, so available == total - reserved.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from preorder.db import asyncpg_dsn
from preorder.stock.keys import product_keys

_PER_PRODUCT = """
SELECT p.id, p.total_stock,
       count(o.id) AS orders,
       coalesce(sum(o.quantity) FILTER (WHERE o.status <> 'cancelled'), 0) AS live
FROM products p LEFT JOIN orders o ON o.product_id = p.id
WHERE p.id = ANY($1::text[])
GROUP BY p.id, p.total_stock
"""


@dataclass
class CheckResult:
    orders_in_pg: int = 0
    created_201: int = 0
    in_flight_bound: int = 0
    oversold: list[str] = field(default_factory=list)
    drifted: list[str] = field(default_factory=list)  # "product: redis reserved X, pg live Y"
    unexpected_answers: int = 0  # non-201/409 answers, socket errors and timeouts over all runs
    seeded: int = 0  # orders written with SQL before the load (the sustained scenario): not answered by anyone

    @property
    def unanswered_orders(self) -> int:
        return self.orders_in_pg - self.seeded - self.created_201

    @property
    def ok(self) -> bool:
        return (0 <= self.unanswered_orders <= self.in_flight_bound and not self.oversold and not self.drifted
                and self.unexpected_answers == 0)

    def lines(self) -> list[str]:
        verdict = "PASS" if self.ok else "FAIL"
        return [
            f"correctness: {verdict}",
            f"  orders in PostgreSQL {self.orders_in_pg - self.seeded:,}"
            + (f" (and {self.seeded:,} seeded with SQL)" if self.seeded else "")
            + f" vs 201s counted by wrk {self.created_201:,} "
            f"(difference {self.unanswered_orders:,}: in flight when wrk stopped, allowed 0..{self.in_flight_bound:,})",
            f"  oversold products (live quantity > total_stock): {len(self.oversold)} {self.oversold[:5]}",
            f"  Redis vs PostgreSQL drift (available != total - reserved): {len(self.drifted)} {self.drifted[:5]}",
            f"  unexpected answers (not 201/409, socket errors, timeouts): {self.unexpected_answers:,}",
        ]


def check(*, database_url: str, redis_url: str, products: list[str], created_201: int, in_flight_bound: int,
          unexpected_answers: int, seeded: int = 0) -> CheckResult:
    result = CheckResult(created_201=created_201, in_flight_bound=in_flight_bound,
                         unexpected_answers=unexpected_answers, seeded=seeded)
    asyncio.run(_compare(database_url, redis_url, products, result))
    return result


async def _compare(database_url: str, redis_url: str, products: list[str], result: CheckResult) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    redis = aioredis.Redis.from_url(redis_url)
    try:
        rows = await conn.fetch(_PER_PRODUCT, products)
        for row in rows:
            result.orders_in_pg += row["orders"]
            if row["live"] > row["total_stock"]:
                result.oversold.append(row["id"])
            total, reserved = await redis.hmget(product_keys(row["id"]).stock, ["total", "reserved"])
            if total is None or reserved is None or (int(total), int(reserved)) != (row["total_stock"], row["live"]):
                result.drifted.append(f"{row['id']}: redis total={total!r} reserved={reserved!r}, "
                                      f"pg total={row['total_stock']} live={row['live']}")
    finally:
        await redis.aclose()
        await conn.close()

