"""All order SQL. Each write is one statement (CTEs), so it is atomic and costs one round trip."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from preorder.db import PgConn, PgPool
from preorder.status import Status

PoolOrConn = PgPool | PgConn
# Every event row is also the outbox entry (events/): its per-order sequence is the previous one + 1, read from
# the unique (order_id, sequence) index in the same statement. Every change is conditional on the status its
# snapshot saw, and a concurrent change alters that status, so a change that applies saw every earlier event.
# A change that moves no status (a refund paid back, a late payment) does not fence a concurrent one that way: a
# statement that waited for the order row while such a change committed read its sequence from an older snapshot.
# The unique index refuses the duplicate, and the statement runs again (_numbered).
_NEXT_SEQUENCE = "(SELECT COALESCE(max(sequence), 0) + 1 FROM order_events WHERE order_id = o.id)"
SEQUENCE_INDEX = "order_events_order_seq_idx"
_SEQUENCE_TRIES = 5


async def _numbered(conn: PoolOrConn, fetch: str, sql: str, *args: Any) -> Any:
    """conn.fetch or conn.fetchrow of a statement that writes an order's next event, again on a fresh snapshot
    while its sequence number was taken meanwhile. Inside a transaction each try is a savepoint, so a refused one
    leaves the transaction usable."""
    tries = 0
    while True:
        try:
            if not isinstance(conn, asyncpg.Pool) and conn.is_in_transaction():
                async with conn.transaction():
                    return await getattr(conn, fetch)(sql, *args)
            return await getattr(conn, fetch)(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            tries += 1
            if exc.constraint_name != SEQUENCE_INDEX or tries == _SEQUENCE_TRIES:
                raise


_COLUMNS = (
    "id AS order_id, product_id, user_id, quantity, status, amount_due, currency, payment_reference, "
    "amount_paid, pay_by, created_at, updated_at, payment_plan, deposit_due, balance_due, balance_starts_at, "
    "balance_ends_at, paid, refunded"
)
# What an order copies from its product at creation (both insert statements): what is due in each phase, and
# the first deadline (the deposit's on a deposit plan), from the rules' clock ($now).
_PLAN_COLUMNS = "payment_plan, deposit_due, balance_due, balance_starts_at, balance_ends_at, deposit_refundable"
_P = "p.id, price_amount, currency, payment_window_seconds, " + (
    "payment_plan, deposit_amount, deposit_credit, deposit_window_seconds, balance_starts_at, balance_ends_at, "
    "deposit_refundable")


def _plan_values(qty: str, now: str) -> str:
    return (f"{now} + make_interval(secs => CASE p.payment_plan WHEN 'deposit' THEN p.deposit_window_seconds "
            f"ELSE p.payment_window_seconds END), now(), now(), p.payment_plan, p.deposit_amount * {qty}, "
            f"(p.price_amount - p.deposit_credit) * {qty}, p.balance_starts_at, p.balance_ends_at, "
            f"p.deposit_refundable")


@dataclass(frozen=True, slots=True)
class NewOrder:
    order_id: uuid.UUID
    product_id: str
    user_id: str
    quantity: int
    epoch: int
    deadline: datetime
    now: datetime  # the rules' clock at creation: pay_by counts from it
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
    SELECT {_P}, total_stock - sold AS free FROM products p
    WHERE id = $2::text AND stock_epoch = $5::bigint FOR NO KEY UPDATE
), o AS (
    INSERT INTO orders (id, product_id, user_id, quantity, status, amount_due, currency,
                        pay_by, created_at, updated_at, {_PLAN_COLUMNS})
    SELECT $1::uuid, p.id, $3::text, $4::int, 'pending', p.price_amount * $4::int, p.currency,
           {_plan_values("$4::int", "$10::timestamptz")}
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
        new.idempotency_key, new.fingerprint, new.idempotency_ttl_s, new.now,
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
    SELECT {_P}, stock_epoch, total_stock - sold AS free
    FROM products p WHERE id IN (SELECT product_id FROM i) ORDER BY id FOR NO KEY UPDATE
), fenced AS (
    SELECT i.*, SUM(i.quantity) OVER (PARTITION BY i.product_id ORDER BY i.n) AS units_so_far
    FROM i JOIN p ON p.id = i.product_id AND p.stock_epoch = i.epoch
    WHERE clock_timestamp() < i.deadline
), o AS (
    INSERT INTO orders (id, product_id, user_id, quantity, status, amount_due, currency,
                        pay_by, created_at, updated_at, {_PLAN_COLUMNS})
    SELECT f.id, p.id, f.user_id, f.quantity, 'pending', p.price_amount * f.quantity, p.currency,
           {_plan_values("f.quantity", "$7::timestamptz")}
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

# The same batch written without locking its products first, so that concurrent batches of a hot product insert side
# by side and hold its row only for the counter update and the commit (measured: create +17% on one hot product,
# where batches waited for each other's whole statement). Its rows are fenced by the epochs this statement's
# snapshot read, which it leaves for the sold trigger (migration 0008); the trigger, holding the row locks, refuses
# the statement if a loader moved an epoch meanwhile (PR409), and the CHECK on `sold` refuses it if Redis
# over-granted; it also refuses it if the batch's earliest write deadline passed while it waited for the locks.
# Either way nothing is written and insert_many writes the batch again with _INSERT_MANY, which locks first and
# answers each order exactly.
_INSERT_MANY_LATE_LOCK = f"""
WITH i AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::timestamptz[])
        WITH ORDINALITY AS t(id, product_id, user_id, quantity, epoch, deadline, n)
), p AS (
    SELECT {_P}, stock_epoch FROM products p WHERE id IN (SELECT product_id FROM i)
), seen AS (
    SELECT set_config('preorder.batch_epochs', COALESCE(jsonb_object_agg(id, stock_epoch), '{{}}')::text, true)
        || set_config('preorder.batch_deadline', (SELECT min(deadline) FROM i)::text, true) AS epochs
    FROM p
), o AS (
    INSERT INTO orders (id, product_id, user_id, quantity, status, amount_due, currency,
                        pay_by, created_at, updated_at, {_PLAN_COLUMNS})
    SELECT f.id, p.id, f.user_id, f.quantity, 'pending', p.price_amount * f.quantity, p.currency,
           {_plan_values("f.quantity", "$7::timestamptz")}
    FROM i f JOIN p ON p.id = f.product_id AND p.stock_epoch = f.epoch
    WHERE clock_timestamp() < f.deadline AND (SELECT epochs FROM seen) IS NOT NULL
    RETURNING *
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT id, NULL, 'pending', user_id, 'created', 1, 'created', to_jsonb(o) FROM o
)
SELECT {_COLUMNS}, NULL::uuid[] AS over_stock FROM (SELECT 1) AS one LEFT JOIN o ON TRUE
"""
EPOCH_MOVED = "PR409"  # raised by the sold trigger (migration 0008)
SOLD_WITHIN_STOCK = "products_sold_within_stock"


async def insert_many(conn: PoolOrConn, news: list[NewOrder]) -> dict[uuid.UUID, Written]:
    """Each order's row, or why it was refused. Not inside a transaction: a refused first statement must leave the
    connection free for the second."""
    args = ([n.order_id for n in news], [n.product_id for n in news], [n.user_id for n in news],
            [n.quantity for n in news], [n.epoch for n in news], [n.deadline for n in news], news[0].now)
    try:
        rows = await conn.fetch(_INSERT_MANY_LATE_LOCK, *args)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate != EPOCH_MOVED and getattr(exc, "constraint_name", None) != SOLD_WITHIN_STOCK:
            raise
        rows = await conn.fetch(_INSERT_MANY, *args)
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
    frm: Status
    to: Status
    actor: str
    reason: str
    cancelled_by: str | None = None  # customer, admin or system: decides which payments a cancel refunds


# Conditional on the current status: of two racing changes (a payment and the sweeper, two cancels), one wins.
# A cancel refunds, in the same statement, every applied payment except the deposit when its customer cancels
# and the product keeps deposits (deposit_refundable false); an admin's cancel refunds everything. One event for
# the change, then one per refund, numbered after it.
_REFUNDABLE = ("(p.outcome = 'applied' "
               "AND NOT (p.kind = 'deposit' AND $6::text = 'customer' AND NOT {o}.deposit_refundable))")
_TRANSITION = f"""
WITH o AS (
    UPDATE orders SET status = $3::text, updated_at = now(), cancelled_by = COALESCE($6::text, cancelled_by),
        refunded = refunded + CASE WHEN $3::text = 'cancelled' THEN COALESCE(
            (SELECT sum(p.amount) FROM payments p WHERE p.order_id = orders.id AND {_REFUNDABLE.format(o="orders")}),
            0) ELSE 0 END
    WHERE id = $1::uuid AND status = $2::text
    RETURNING *
), rp AS (
    SELECT p.*, row_number() OVER (ORDER BY p.id) AS k FROM payments p JOIN o ON p.order_id = o.id
    WHERE $3::text = 'cancelled' AND {_REFUNDABLE.format(o="o")}
), r AS (
    INSERT INTO refunds (order_id, payment_id, amount, currency, payment_reference, reason)
    SELECT order_id, id, amount, currency, reference, $5::text FROM rp
), seq AS (
    SELECT COALESCE(max(sequence), 0) AS n FROM order_events WHERE order_id = $1::uuid
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT o.id, $2::text, $3::text, $4::text, $5::text, seq.n + 1, $3::text, to_jsonb(o) FROM o, seq
    UNION ALL
    SELECT o.id, $3::text, $3::text, $4::text, 'refund ' || rp.reference, seq.n + 1 + rp.k, 'refund_created',
           to_jsonb(o)
    FROM o, seq, rp
)
SELECT {_COLUMNS} FROM o
"""


async def transition(conn: PoolOrConn, change: Change) -> asyncpg.Record | None:
    """None when the order was no longer in `frm` (someone else changed it first)."""
    return await _numbered(  # type: ignore[no-any-return]
        conn, "fetchrow", _TRANSITION, change.order_id, change.frm, change.to, change.actor, change.reason,
        change.cancelled_by,
    )


@dataclass(frozen=True, slots=True)
class NewPayment:
    order_id: uuid.UUID
    kind: str
    reference: str
    amount: int
    currency: str
    actor: str
    frm: Status  # the status this payment moves the order from, and to
    to: Status
    now: datetime  # the rules' clock: the payment's deadline is compared against it
    seen: datetime  # the order's updated_at when it was read: a late payment is recorded only against that
    late_ok: bool  # record (and refund) a payment the order can no longer take; else record nothing


# A payment is applied when the order is still in `frm` and inside that phase's window; then the order moves on.
# Otherwise, with late_ok, it is still recorded (a provider has taken that money) with a pending refund, and the
# order is unchanged but for `refunded`; that branch is conditional on the order being as it was read (updated_at),
# so its events follow every earlier one, and a race lost answers no row (the caller re-reads and retries).
# Events: the payment, then the status change or the refund.
_PAY = """
WITH o AS (
    UPDATE orders SET status = $8::text, updated_at = now(), paid = paid + $4::bigint,
        amount_paid = paid + $4::bigint, payment_reference = $3::text
    WHERE id = $1::uuid AND status = $7::text AND CASE WHEN $7::text = 'pending' THEN pay_by > $10::timestamptz
          ELSE balance_starts_at <= $10::timestamptz AND balance_ends_at > $10::timestamptz END
    RETURNING *
), late AS (
    UPDATE orders SET updated_at = now(), refunded = refunded + $4::bigint
    WHERE id = $1::uuid AND $12::boolean AND updated_at = $11::timestamptz AND NOT EXISTS (SELECT 1 FROM o)
    RETURNING *
), c AS (
    SELECT o.*, $7::text AS was, TRUE AS applied FROM o
    UNION ALL SELECT late.*, late.status, FALSE FROM late
), pay AS (
    INSERT INTO payments (order_id, kind, reference, amount, currency, outcome, actor)
    SELECT id, $2::text, $3::text, $4::bigint, $5::text, CASE WHEN applied THEN 'applied' ELSE 'refunded' END,
           $6::text FROM c
    RETURNING *
), r AS (
    INSERT INTO refunds (order_id, payment_id, amount, currency, payment_reference, reason)
    SELECT order_id, id, amount, currency, reference, 'late_payment' FROM pay WHERE outcome = 'refunded'
    RETURNING *
), seq AS (
    SELECT COALESCE(max(sequence), 0) AS n FROM order_events WHERE order_id = $1::uuid
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT c.id, c.was, c.was, $6::text, $2::text || ' payment ' || $3::text, seq.n + 1, 'payment_recorded',
           to_jsonb(c) - 'was' - 'applied' FROM c, seq
    UNION ALL
    SELECT c.id, c.was, c.status, $6::text,
           CASE WHEN c.applied THEN $9::text ELSE 'late_payment' END, seq.n + 2,
           CASE WHEN c.applied THEN c.status ELSE 'refund_created' END, to_jsonb(c) - 'was' - 'applied' FROM c, seq
)
SELECT (SELECT id FROM pay) AS payment_id, (SELECT applied FROM c) AS applied
"""


async def pay(conn: PoolOrConn, payment: NewPayment, *, reason: str) -> asyncpg.Record:
    """payment_id None: nothing recorded (the order was not in `frm`, or changed since it was read)."""
    row = await _numbered(
        conn, "fetchrow", _PAY, payment.order_id, payment.kind, payment.reference, payment.amount, payment.currency,
        payment.actor, payment.frm, payment.to, reason, payment.now, payment.seen, payment.late_ok,
    )
    assert row is not None
    return row  # type: ignore[no-any-return]


_PAYMENT_COLUMNS = "id AS payment_id, order_id, kind, reference, amount, currency, outcome, actor, created_at"
_REFUND_COLUMNS = ("id AS refund_id, order_id, payment_id, amount, currency, reason, status, provider_reference, "
                   "created_at, succeeded_at")


async def payment_by_reference(conn: PoolOrConn, reference: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE reference = $1", reference)


async def payments(conn: PoolOrConn, order_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE order_id = $1 ORDER BY id", order_id)


async def refunds(conn: PoolOrConn, order_id: uuid.UUID, *, payment_id: int | None = None) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE order_id = $1 AND ($2::bigint IS NULL OR payment_id = $2) "
        "ORDER BY id",
        order_id, payment_id,
    )


# A refund paid back is an event of its order too (I5: each payment and refund is one event row), written in the
# same statement: the order's status unchanged, the next sequence, the order as it is.
_REFUND_SUCCEEDED = f"""
WITH r AS (
    UPDATE refunds SET status = 'succeeded', provider_reference = $3, succeeded_at = now()
    WHERE id = $1 AND order_id = $2 AND status = 'pending'
    RETURNING {_REFUND_COLUMNS}
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT o.id, o.status, o.status, $4::text, 'refund ' || r.refund_id || ' succeeded: ' || $3::text,
           {_NEXT_SEQUENCE}, 'refund_succeeded', to_jsonb(o)
    FROM orders o JOIN r ON r.order_id = o.id
)
SELECT * FROM r
"""


async def refund_succeeded(conn: PgConn, refund_id: int, order_id: uuid.UUID, *,
                           provider_reference: str, actor: str) -> asyncpg.Record | None:
    """pending -> succeeded, once, with its event: None when it is not this order's pending refund. Inside a
    transaction: the order row is locked first, by a statement of its own, so the event's sequence is read after
    every other change of the order has committed (a statement reads one snapshot, even after a lock wait)."""
    await conn.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order_id)
    return await conn.fetchrow(_REFUND_SUCCEEDED, refund_id, order_id, provider_reference, actor)


async def refund(conn: PoolOrConn, refund_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE id = $1", refund_id)


async def events(conn: PoolOrConn, order_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT type, from_status, to_status, actor, reason, created_at AS at
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


# The sweeper's two deadlines, against the rules' clock ($2). Conditional updates of rows locked with SKIP LOCKED:
# a payment racing one of them either commits first (the row is no longer in the status and is skipped) or waits
# and then finds the status changed (its own conditional update applies to nothing).
_EXPIRE = f"""
WITH due AS (
    SELECT id FROM orders WHERE status = 'pending' AND pay_by <= $2::timestamptz
    ORDER BY pay_by LIMIT $1 FOR UPDATE SKIP LOCKED
), o AS (
    UPDATE orders SET status = 'cancelled', cancelled_by = 'system', updated_at = now()
    FROM due WHERE orders.id = due.id AND orders.status = 'pending'
    RETURNING orders.*
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT id, 'pending', 'cancelled', 'system',
           CASE payment_plan WHEN 'deposit' THEN 'deposit_timeout' ELSE 'payment_timeout' END,
           {_NEXT_SEQUENCE}, 'cancelled', to_jsonb(o) FROM o
)
SELECT id, product_id, user_id, quantity FROM o
"""


async def expire_due(conn: PoolOrConn, *, limit: int, now: datetime) -> list[asyncpg.Record]:
    """Cancel pending orders past their payment (or deposit) window; SKIP LOCKED lets several sweepers share."""
    return await _numbered(conn, "fetch", _EXPIRE, limit, now)  # type: ignore[no-any-return]


# Balance window closed on a deposit-paid order: forfeited, the deposit kept (no refund), the stock released.
_FORFEIT = f"""
WITH due AS (
    SELECT id FROM orders WHERE status = 'deposit_paid' AND balance_ends_at <= $2::timestamptz
    ORDER BY balance_ends_at LIMIT $1 FOR UPDATE SKIP LOCKED
), o AS (
    UPDATE orders SET status = 'forfeited', updated_at = now()
    FROM due WHERE orders.id = due.id AND orders.status = 'deposit_paid'
    RETURNING orders.*
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT id, 'deposit_paid', 'forfeited', 'system', 'balance_timeout', {_NEXT_SEQUENCE}, 'forfeited',
           to_jsonb(o) FROM o
)
SELECT id, product_id FROM o
"""


async def forfeit_due(conn: PoolOrConn, *, limit: int, now: datetime) -> list[asyncpg.Record]:
    """Forfeit deposit-paid orders whose balance window has closed."""
    return await _numbered(conn, "fetch", _FORFEIT, limit, now)  # type: ignore[no-any-return]


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
