"""The invariant checker every stock test uses: I1 from PostgreSQL, I2 Redis against PostgreSQL, I3 orders,
and the I4/I5 traces PostgreSQL keeps (one creation per order, one release per cancelled order, a whole history,
one event per payment, refund and refund paid back)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg
import httpx

from preorder.cache import RedisClient
from preorder.status import LIVE, RELEASED
from preorder.stock.keys import product_keys
from preorder.stock.service import parse_hold

# Every 201 a test client saw for POST /api/preorder (order id -> quantity): the clients of conftest.py and
# harness.py record them with a response hook, and conftest.py empties it before each test. So I3 is checked for
# every order a test created, not only for the ones it thought to pass.
ANSWERED: dict[str, int] = {}


async def record_created(response: httpx.Response) -> None:
    """An httpx response hook."""
    request = response.request
    if response.status_code == 201 and request.method == "POST" and request.url.path == "/api/preorder":
        await response.aread()
        body = response.json()
        ANSWERED[body["order_id"]] = body["quantity"]


async def assert_invariants(
    db: asyncpg.Connection,
    redis: RedisClient,
    *,
    created: Iterable[str] | Mapping[str, int] = (),
    settled: bool = True,
) -> None:
    """I1 never oversold, and PostgreSQL's sold counter equals its orders; I3 every 201 order is stored with its
    quantity (every one the test clients saw, and `created`); I4/I5 each order has one creation event, at most one
    cancellation, and a history that ends in its status. With settled=True (traffic stopped, holds settled) also
    I2 for every product: it is loaded in Redis, available == total - reserved computed from PostgreSQL, the holds
    are exactly the pending and paid orders, the per-user counts match."""
    if await db.fetchval("SELECT count(*) > 10000 FROM orders"):
        # Rows written in bulk (the scale and fault tests seed 20,000-100,000 orders) leave the planner's statistics
        # saying the tables are nearly empty: its nested loops would make the checks below quadratic.
        await db.execute("ANALYZE orders, order_events, payments, refunds")
    rows = await db.fetch(
        """SELECT p.id, p.total_stock, p.sold,
                  COALESCE(SUM(o.quantity) FILTER (WHERE order_holds_stock(o.status)), 0) AS reserved
           FROM products p LEFT JOIN orders o ON o.product_id = p.id GROUP BY p.id"""
    )
    for r in rows:
        assert r["reserved"] <= r["total_stock"], f"I1 oversold {r['id']}: {r['reserved']} > {r['total_stock']}"
        assert r["sold"] == r["reserved"], (
            f"I1 sold counter of {r['id']} is {r['sold']}, its orders hold {r['reserved']}")
        if not settled:
            continue
        total, reserved = await redis.hmget(product_keys(r["id"]).stock, ["total", "reserved"])
        assert total is not None and reserved is not None, f"I2 {r['id']} is not loaded in Redis"
        assert int(total) == r["total_stock"], f"I2 total drift on {r['id']}"
        assert int(reserved) == r["reserved"], f"I2 leak on {r['id']}: redis {int(reserved)} pg {r['reserved']}"
        await _assert_holds_match(db, redis, r["id"])
    await _assert_created(db, created)
    await _assert_histories(db)
    await assert_money(db)


async def _assert_created(db: asyncpg.Connection, given: Iterable[str] | Mapping[str, int]) -> None:
    created: dict[str, int | None] = dict.fromkeys(given) if not isinstance(given, Mapping) else dict(given)
    created.update(ANSWERED)
    ids = list(created)
    stored = {str(r["id"]): r["quantity"] for r in
              await db.fetch("SELECT id, quantity FROM orders WHERE id = ANY($1::uuid[])", ids)}
    assert len(stored) == len(ids), f"I3 lost orders: {len(ids) - len(stored)} of {len(ids)} answered 201 are missing"
    wrong = {oid: (qty, stored[oid]) for oid, qty in created.items() if qty is not None and stored[oid] != qty}
    assert not wrong, f"I3 stored quantity differs from the 201 answer: {wrong}"


async def _assert_holds_match(db: asyncpg.Connection, redis: RedisClient, product_id: str) -> None:
    holds_key, users_key = product_keys(product_id).holds, product_keys(product_id).users
    holds = {str(h.order_id): (h.quantity, h.user_id)
             for h in (parse_hold(k, v) for k, v in (await redis.hgetall(holds_key)).items())}
    orders = await db.fetch("SELECT id, user_id, quantity, status FROM orders WHERE product_id = $1", product_id)
    live = {str(o["id"]): (o["quantity"], o["user_id"]) for o in orders if o["status"] in LIVE}
    assert holds == live, (f"I2 holds of {product_id} differ from its pending and paid orders: "
                           f"extra {sorted(set(holds) - set(live))[:5]}, missing {sorted(set(live) - set(holds))[:5]}")
    per_user: dict[str, int] = defaultdict(int)
    for o in orders:
        if o["status"] not in RELEASED:
            per_user[o["user_id"]] += o["quantity"]
    counted = {k.decode(): int(v) for k, v in (await redis.hgetall(users_key)).items()}
    assert counted == dict(per_user), f"I2 per-user counts of {product_id} drifted: redis {counted} pg {dict(per_user)}"


async def _assert_histories(db: asyncpg.Connection) -> None:
    # One pass over the events, grouped per order (a correlated subquery per order was quadratic: minutes at
    # 100,000 orders).
    broken = await db.fetch(
        """WITH ev AS (
               SELECT order_id, from_status, to_status,
                      lag(to_status) OVER w AS prev_to, row_number() OVER w AS n,
                      count(*) OVER (PARTITION BY order_id) AS events
               FROM order_events WINDOW w AS (PARTITION BY order_id ORDER BY id)
           ), per AS (
               SELECT order_id,
                      bool_or(n = 1 AND from_status IS NULL AND to_status = 'pending') AS created,
                      bool_or(n > 1 AND from_status IS DISTINCT FROM prev_to) AS gap,
                      max(to_status) FILTER (WHERE n = events) AS last,
                      count(*) FILTER (WHERE to_status IN ('cancelled', 'forfeited')
                                           AND from_status IS DISTINCT FROM to_status) AS releases
               FROM ev GROUP BY order_id
           )
           SELECT o.id, o.status FROM orders o LEFT JOIN per ON per.order_id = o.id
           WHERE per.order_id IS NULL OR NOT per.created OR per.gap OR per.last IS DISTINCT FROM o.status
              OR per.releases > 1
           LIMIT 5"""
    )
    assert not broken, f"I4/I5 event history broken (created or released twice, or a gap) for {broken}"
    # I5 for money: each payment, each refund and each refund paid back is one event row of its order. One
    # aggregate over the three tables (events count +1, rows -1), no join a stale plan could make quadratic.
    uncounted = await db.fetch(
        """SELECT order_id, sum(p) AS payments, sum(r) AS refunds, sum(s) AS succeeded FROM (
               SELECT order_id, (type = 'payment_recorded')::int AS p, (type = 'refund_created')::int AS r,
                      (type = 'refund_succeeded')::int AS s
               FROM order_events WHERE type IN ('payment_recorded', 'refund_created', 'refund_succeeded')
               UNION ALL SELECT order_id, -1, 0, 0 FROM payments
               UNION ALL SELECT order_id, 0, -1, -(status = 'succeeded')::int FROM refunds
           ) x GROUP BY order_id HAVING sum(p) <> 0 OR sum(r) <> 0 OR sum(s) <> 0
           LIMIT 5"""
    )
    assert not uncounted, ("I5 a payment or refund without exactly one event row (events less rows): "
                           f"{[dict(r) for r in uncounted]}")


# I6: what the merchant keeps of an order by the rules, computed from its status and history alone:
# - deposit plus balance once paid (the price on a full plan; less the deposit's inflation on a deposit plan);
# - the deposit while awaiting the balance, when forfeited, or when its customer cancelled after paying it and the
#   product keeps deposits;
# - nothing otherwise (an admin's cancel, a cancel before any payment, a timeout).
_KEPT = """
    CASE
        WHEN o.status IN ('paid', 'shipped', 'completed') THEN o.deposit_due + o.balance_due
        WHEN o.status IN ('deposit_paid', 'forfeited') THEN o.deposit_due
        WHEN o.status = 'cancelled' AND o.cancelled_by = 'customer' AND NOT o.deposit_refundable
             AND EXISTS (SELECT 1 FROM order_events e WHERE e.order_id = o.id AND e.to_status = 'deposit_paid'
                         AND e.from_status = 'pending') THEN o.deposit_due
        ELSE 0
    END"""


async def assert_money(db: asyncpg.Connection) -> None:
    """I6: for every order, sum(payments) - sum(refunds) is what the merchant keeps by the rules, and the order's
    own paid/refunded figures agree; every payment has its order and an outcome, and every payment the order
    could not take has its refund."""
    wrong = await db.fetch(
        f"""SELECT o.id, o.status, o.payment_plan, pay.total AS payments, ref.total AS refunds, {_KEPT} AS kept,
                   o.paid, pay.applied, o.refunded
            FROM orders o
            CROSS JOIN LATERAL (SELECT COALESCE(sum(amount), 0) AS total,
                                       COALESCE(sum(amount) FILTER (WHERE outcome = 'applied'), 0) AS applied
                                FROM payments p WHERE p.order_id = o.id) pay
            CROSS JOIN LATERAL (SELECT COALESCE(sum(amount), 0) AS total FROM refunds r WHERE r.order_id = o.id) ref
            WHERE pay.total - ref.total <> {_KEPT} OR o.paid <> pay.applied OR o.refunded <> ref.total
            LIMIT 5"""
    )
    assert not wrong, f"I6 money: payments - refunds differ from what the rules keep: {[dict(w) for w in wrong]}"
    lost = await db.fetch(
        """SELECT p.id, p.reference, p.outcome FROM payments p
           WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = p.order_id) OR p.outcome IS NULL
              OR (p.outcome = 'refunded' AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.payment_id = p.id))
           LIMIT 5"""
    )
    assert not lost, f"I6 payments without their order, outcome or refund: {[dict(r) for r in lost]}"


async def assert_events_delivered(db: asyncpg.Connection, sinks: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """I7: every event row written since the outbox exists reached every sink (name -> the events it got, in the
    order it got them) at least once; a duplicate is the same document with the same id; per order, the sequence a
    sink saw never goes back, and the first copies arrive in sequence order."""
    rows = await db.fetch("SELECT event_id, order_id, sequence, type FROM order_events WHERE data IS NOT NULL")
    expected = {str(r["event_id"]): (str(r["order_id"]), r["sequence"], "preorder.order." + r["type"]) for r in rows}
    for sink, events in sinks.items():
        first: dict[str, Mapping[str, Any]] = {}
        last: dict[str, int] = {}
        for e in events:
            assert first.setdefault(e["id"], e) == e, f"I7 {sink}: two different documents share the id {e['id']}"
            assert e["sequence"] >= last.get(e["subject"], 0), f"I7 {sink}: order {e['subject']} went back in sequence"
            last[e["subject"]] = e["sequence"]
        missing = set(expected) - set(first)
        assert not missing, f"I7 {sink} lacks {len(missing)} of {len(expected)} events, e.g. {sorted(missing)[:3]}"
        wrong = [i for i, e in first.items() if expected.get(i) != (e["subject"], e["sequence"], e["type"])]
        assert not wrong, f"I7 {sink} got events that do not match their rows (or no row): {wrong[:3]}"
