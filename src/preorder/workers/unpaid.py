"""The safety net under the customers' unpaid-units counters in Redis: recount them from PostgreSQL.

The counters move with every create, payment, cancel and expiry; what can leave one wrong is a process killed
between a create's admission and its order write (the units stay counted, the order never exists), Redis
losing its data (the counters are gone), or a give-back that failed while Redis was down. Each pass reads the
counters, then PostgreSQL's pending units per customer, and sets every counter that differs, but only if it has
not moved in between (a compare-and-set in unpaid.lua). Margin: a create or payment of that customer still in
flight during the pass (at most write_deadline_s) can make the count off by that order's units until the
next pass.

One process of the deployment recounts per interval: each process wakes every interval, and the first to take a
lease in Redis (a little shorter than the interval) does the pass; the others skip it. The pass reads every pending
order in PostgreSQL, so done by every process it cost each one that read every interval."""

from __future__ import annotations

from preorder.orders import repository as repo
from preorder.orders.service import Orders
from preorder.stock.keys import UNPAID_RECOUNT_LEASE

LEASE_SHARE = 0.9  # of the interval: the holder's own next wake finds its lease expired


async def recount_unpaid_once(orders: Orders, *, every_s: float) -> int | None:
    """The recount, if no other process took this interval's lease: how many counters it corrected, or None."""
    if not await orders.redis.set(UNPAID_RECOUNT_LEASE, "1", nx=True, px=max(int(every_s * LEASE_SHARE * 1000), 1)):
        return None
    return await recount_unpaid(orders)


async def recount_unpaid(orders: Orders) -> int:
    """Returns how many counters it corrected."""
    limits = orders.stock.customers
    seen = {user: value async for user, value in limits.counted()}
    counted = await repo.unpaid_by_customer(orders.pool)
    fixed = 0
    for user in seen.keys() | counted.keys():
        was, units = seen.get(user, ""), counted.get(user, 0)
        if was != (str(units) if units else ""):
            fixed += await limits.recount(user, seen=was, counted=units)
    return fixed
