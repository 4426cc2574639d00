"""All order SQL. Each write is one statement (CTEs), so it is atomic and costs one round trip."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from preorder.db import PgConn, PgPool

PoolOrConn = PgPool | PgConn
# Every event row is also the outbox entry (events/): its per-order sequence is the previous one + 1, read from
# the unique (order_id, sequence) index in the same statement. Every change is conditional on the status its
# snapshot saw, and a concurrent change alters that status, so a change that applies saw every earlier event.
_NEXT_SEQUENCE = "(SELECT COALESCE(max(sequence), 0) + 1 FROM order_events WHERE order_id = o.id)"
_COLUMNS = (
    "id AS order_id, product_id, user_id, quantity, status, amount_due, currency, payment_reference, "
    "amount_paid, pay_by, created_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class NewOrder:
    order_id: uuid.UUID
    product_id: str
    user_id: str
    quantity: int
    epoch: int
    deadline: datetime
    idempotency_key: str | None = None
    fingerprint: str | None = None
    idempotency_ttl_s: int = 86_400


# The product row is locked with the epoch the reservation saw: a loader holding FOR UPDATE makes us wait, and
# once it has bumped the epoch this inserts nothing (the reservation is stale). The row also carries `sold`
# (migration 0003): an order that would take it past total_stock is not inserted, whatever Redis said (Redis can
# go back in time). clock_timestamp() < deadline: a write can never land after the reconciler may treat its hold
# as orphaned.
_INSERT = f"""
WITH p AS (
    SELECT id, price_amount, currency, payment_window_seconds, total_stock - sold AS free FROM products
    WHERE id = $2::text AND stock_epoch = $5::bigint FOR NO KEY UPDATE
), o AS (
    INSERT INTO orders (id, product_id, user_id, quantity, status, amount_due, currency,
                        pay_by, created_at, updated_at)
    SELECT $1::uuid, p.id, $3::text, $4::int, 'pending', p.price_amount * $4::int, p.currency,
           now() + make_interval(secs => p.payment_window_seconds), now(), now()
    FROM p WHERE clock_timestamp() < $6::timestamptz AND $4::int <= p.free
    RETURNING *
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT id, NULL, 'pending', $3, 'created', 1, 'created', to_jsonb(o) FROM o
), i AS (
    INSERT INTO idempotency_keys (user_id, key, fingerprint, order_id, expires_at)
    SELECT $3::text, $7::text, $8::text, id, now() + make_interval(secs => $9::int) FROM o WHERE $7::text IS NOT NULL
)
SELECT {_COLUMNS}, (SELECT $4::int > p.free FROM p) AS over_stock FROM (SELECT 1) AS one LEFT JOIN o ON TRUE
"""


class Refused(enum.Enum):
    """Why an order row was not written (the reservation must be given back)."""

    FENCED = "fenced"  # the stock was rebuilt since the reservation (epoch), or the write deadline passed
    # PostgreSQL's sold count has no room for it, though Redis granted it: Redis is behind (went back in time).
    OVER_STOCK = "over_stock"


Written = asyncpg.Record | Refused


async def insert(conn: PoolOrConn, new: NewOrder) -> Written:
    row = await conn.fetchrow(
        _INSERT,
        new.order_id, new.product_id, new.user_id, new.quantity, new.epoch, new.deadline,
        new.idempotency_key, new.fingerprint, new.idempotency_ttl_s,
    )
    assert row is not None  # the statement always answers one row
    if row["order_id"] is not None:
        return row  # type: ignore[no-any-return]
    return Refused.OVER_STOCK if row["over_stock"] else Refused.FENCED


# Group commit: the same fences, row by row, for many orders in one statement and one WAL flush. Only orders
# without an Idempotency-Key come here, so no row can fail on a unique key and take the others down with it.
# The product rows are locked in id order (as the sold-counter triggers lock them: no deadlock), and a row is
# inserted only while the units before it in the batch, and its own, still fit in total_stock - sold.
_INSERT_MANY = f"""
WITH i AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::timestamptz[])
        WITH ORDINALITY AS t(id, product_id, user_id, quantity, epoch, deadline, n)
), p AS (
    SELECT id, price_amount, currency, payment_window_seconds, stock_epoch, total_stock - sold AS free
    FROM products WHERE id IN (SELECT product_id FROM i) ORDER BY id FOR NO KEY UPDATE
), fenced AS (
    SELECT i.*, SUM(i.quantity) OVER (PARTITION BY i.product_id ORDER BY i.n) AS units_so_far
    FROM i JOIN p ON p.id = i.product_id AND p.stock_epoch = i.epoch
    WHERE clock_timestamp() < i.deadline
), o AS (
    INSERT INTO orders (id, product_id, user_id, quantity, status, amount_due, currency,
                        pay_by, created_at, updated_at)
    SELECT f.id, p.id, f.user_id, f.quantity, 'pending', p.price_amount * f.quantity, p.currency,
           now() + make_interval(secs => p.payment_window_seconds), now(), now()
    FROM fenced f JOIN p ON p.id = f.product_id
    WHERE f.units_so_far <= p.free
    RETURNING *
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT id, NULL, 'pending', user_id, 'created', 1, 'created', to_jsonb(o) FROM o
), over AS (
    SELECT array_agg(f.id) AS over_stock FROM fenced f JOIN p ON p.id = f.product_id WHERE f.units_so_far > p.free
)
SELECT {_COLUMNS}, over.over_stock FROM over LEFT JOIN o ON TRUE
"""


async def insert_many(conn: PoolOrConn, news: list[NewOrder]) -> dict[uuid.UUID, Written]:
    """Each order's row, or why it was refused."""
    rows = await conn.fetch(
        _INSERT_MANY,
        [n.order_id for n in news], [n.product_id for n in news], [n.user_id for n in news],
        [n.quantity for n in news], [n.epoch for n in news], [n.deadline for n in news],
    )
    over_stock = set(rows[0]["over_stock"] or ())  # the statement always answers at least one row
    written: dict[uuid.UUID, Written] = {r["order_id"]: r for r in rows if r["order_id"] is not None}
    for n in news:
        if n.order_id not in written:
            written[n.order_id] = Refused.OVER_STOCK if n.order_id in over_stock else Refused.FENCED
    return written


async def get(conn: PoolOrConn, order_id: uuid.UUID, *, user_id: str | None) -> asyncpg.Record | None:
    """With user_id, only that customer's order: another's answers None, like a missing one."""
    return await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM orders WHERE id = $1 AND ($2::text IS NULL OR user_id = $2)", order_id, user_id
    )


@dataclass(frozen=True, slots=True)
class Filters:
    user_id: str | None = None
    status: str | None = None
    product_id: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    before_id: uuid.UUID | None = None


_FILTERS = (
    ("user_id", "user_id = ${}"),
    ("status", "status = ${}"),
    ("product_id", "product_id = ${}"),
    ("created_from", "created_at >= ${}"),
    ("created_to", "created_at < ${}"),
    ("before_id", "id < ${}"),
)


async def page(conn: PoolOrConn, filters: Filters, *, limit: int) -> list[asyncpg.Record]:
    """Newest first. Only the filters given make it into the SQL, so the planner can use the indexes."""
    where, args = ["TRUE"], []
    for name, clause in _FILTERS:
        value = getattr(filters, name)
        if value is not None:
            args.append(value)
            where.append(clause.format(len(args)))
    args.append(limit)
    sql = f"SELECT {_COLUMNS} FROM orders WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ${len(args)}"
    return await conn.fetch(sql, *args)


@dataclass(frozen=True, slots=True)
class Change:
    order_id: uuid.UUID
    frm: str
    to: str
    actor: str
    reason: str
    payment_reference: str | None = None
    amount_paid: int | None = None


# Conditional on the current status: of two racing changes (payment and the timeout sweeper), one wins.
# A payment after the payment window is refused even if the sweeper has not run yet.
_TRANSITION = f"""
WITH o AS (
    UPDATE orders SET status = $3::text, updated_at = now(),
        payment_reference = COALESCE($6::text, payment_reference), amount_paid = COALESCE($7::bigint, amount_paid)
    WHERE id = $1::uuid AND status = $2::text AND ($3::text <> 'paid' OR pay_by > now())
    RETURNING *
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT id, $2::text, $3::text, $4::text, $5::text, {_NEXT_SEQUENCE}, $3::text, to_jsonb(o) FROM o
), r AS (
    INSERT INTO refunds (order_id, amount, currency, payment_reference)
    SELECT id, amount_paid, currency, payment_reference FROM o WHERE $2 = 'paid' AND $3 = 'cancelled'
)
SELECT {_COLUMNS} FROM o
"""


async def transition(conn: PoolOrConn, change: Change) -> asyncpg.Record | None:
    """None when the order was no longer in `frm` (someone else changed it first) or its window closed."""
    return await conn.fetchrow(
        _TRANSITION,
        change.order_id, change.frm, change.to, change.actor, change.reason,
        change.payment_reference, change.amount_paid,
    )


async def events(conn: PoolOrConn, order_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT from_status, to_status, actor, reason, created_at AS at
           FROM order_events WHERE order_id = $1 ORDER BY sequence""",
        order_id,
    )


async def find_idempotent(conn: PoolOrConn, user_id: str, key: str) -> asyncpg.Record | None:
    """The live idempotency record for this customer's key; an expired one is deleted and ignored."""
    row = await conn.fetchrow(
        "SELECT fingerprint, order_id, expires_at > now() AS live FROM idempotency_keys "
        "WHERE user_id = $1 AND key = $2",
        user_id, key,
    )
    if row is not None and not row["live"]:
        await conn.execute(
            "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND expires_at <= now()", user_id, key
        )
        return None
    return row


_EXPIRE = f"""
WITH due AS (
    SELECT id FROM orders WHERE status = 'pending' AND pay_by <= now()
    ORDER BY pay_by LIMIT $1 FOR UPDATE SKIP LOCKED
), o AS (
    UPDATE orders SET status = 'cancelled', updated_at = now()
    FROM due WHERE orders.id = due.id AND orders.status = 'pending'
    RETURNING orders.*
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT id, 'pending', 'cancelled', 'system', 'payment_timeout', {_NEXT_SEQUENCE}, 'cancelled', to_jsonb(o) FROM o
)
SELECT id, product_id, user_id, quantity FROM o
"""


async def expire_due(conn: PoolOrConn, *, limit: int) -> list[asyncpg.Record]:
    """Cancel pending orders past their payment window; SKIP LOCKED lets several sweepers share the work."""
    return await conn.fetch(_EXPIRE, limit)


async def purge_idempotency(conn: PoolOrConn, *, limit: int) -> int:
    result = await conn.execute(
        "DELETE FROM idempotency_keys WHERE ctid IN "
        "(SELECT ctid FROM idempotency_keys WHERE expires_at <= now() LIMIT $1)",
        limit,
    )
    return int(result.split()[-1])


async def unpaid_by_customer(conn: PoolOrConn) -> dict[str, int]:
    """Units in pending (unpaid) orders, per customer: the truth the Redis unpaid counters are recounted from."""
    rows = await conn.fetch("SELECT user_id, SUM(quantity)::int AS units FROM orders WHERE status = 'pending' "
                            "GROUP BY user_id")
    return {r["user_id"]: r["units"] for r in rows}
