"""All events SQL: the outbox (order_events), the sinks and their deliveries, the pull feed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from preorder.db import PgConn, PgPool

PoolOrConn = PgPool | PgConn
_FULL_TYPE = "'preorder.order.' || e.type"

# Queue the events after the fan-out cursor for each sink that takes them (a paused or disabled endpoint too: it
# gets its backlog when resumed), and move the cursor past them, in one statement (migration 0009). Only events of
# transactions older than every running one are taken (the snapshot's xmin): no event can commit behind the cursor
# later. Relays in several processes take turns (SKIP LOCKED on the cursor's row). The order in which events are
# queued does not matter: a delivery is sent only once every earlier event of its order is fanned out and
# delivered (see _CLAIM).
_FAN_OUT = f"""
WITH cursor AS (
    SELECT txid, id FROM event_fanout FOR UPDATE SKIP LOCKED
), ev AS (
    SELECT id, txid, order_id, sequence, type, created_at FROM order_events e
    WHERE (txid, id) > ((SELECT txid FROM cursor), (SELECT id FROM cursor))
      AND txid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY txid, id LIMIT $1
), d AS (
    INSERT INTO event_deliveries (sink_id, event_row, order_id, sequence, event_at, give_up_at)
    SELECT s.id, e.id, e.order_id, e.sequence, e.created_at, now() + make_interval(secs => $2::float8)
    FROM ev e JOIN event_sinks s ON s.event_types IS NULL OR {_FULL_TYPE} = ANY (s.event_types)
    ON CONFLICT (sink_id, event_row) DO NOTHING
), moved AS (
    UPDATE event_fanout f SET txid = last.txid, id = last.id, updated_at = now()
    FROM (SELECT txid, id FROM ev ORDER BY txid DESC, id DESC LIMIT 1) last
)
SELECT count(*) FROM ev
"""
# An event the fan-out has not passed yet: a condition on order_events `q` (the cursor's row is read once).
_NOT_FANNED_OUT = "(q.txid, q.id) > ((SELECT txid FROM event_fanout), (SELECT id FROM event_fanout))"


async def fan_out(conn: PoolOrConn, *, limit: int, retry_for_s: float) -> int:
    """How many events were queued (limit: there may be more)."""
    return int(await conn.fetchval(_FAN_OUT, limit, retry_for_s))


async def sync_nats_sink(conn: PoolOrConn, url: str) -> None:
    """The NATS sink exists exactly while NATS is configured: without it, its queue (and the lag) would grow."""
    if not url:
        await conn.execute("DELETE FROM event_sinks WHERE kind = 'nats'")
        return
    await conn.execute(
        """INSERT INTO event_sinks (id, kind, url) VALUES ($1, 'nats', $2)
           ON CONFLICT (kind) WHERE kind = 'nats' DO UPDATE SET url = EXCLUDED.url, updated_at = now()""",
        uuid.uuid4(), url,
    )


# The deliveries due now whose sink is active and that are first in line: no earlier event of the same order is
# still pending for that sink or not yet fanned out. A claim is a lease: next_attempt_at moves past the time a send
# can take, so a process killed mid-send leaves the delivery to be retried, and no other process takes it meanwhile.
# Each active sink's due deliveries are read in index order up to the limit (migration 0009): the work is the
# limit's, not the backlog's (it sorted every due delivery, 115 ms a claim under a backlog of 50,000). So that
# deliveries waiting for an earlier one of their order do not fill the head of the line, a due delivery found
# behind a pending one is parked until that one's next try, and at least the lease; _RECORD moves the deliveries
# behind a failed one to its next try, and makes them due at once when it is finished.
_CLAIM = f"""
WITH due AS (
    SELECT d.* FROM event_sinks s CROSS JOIN LATERAL (
        SELECT id, sink_id, order_id, sequence, next_attempt_at FROM event_deliveries
        WHERE sink_id = s.id AND status = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at, id LIMIT $2
    ) d
    WHERE s.kind = $1 AND s.status = 'active'
), behind AS (
    SELECT x.id, p.next_attempt_at AS until FROM due x CROSS JOIN LATERAL (
        SELECT next_attempt_at FROM event_deliveries p
        WHERE p.sink_id = x.sink_id AND p.order_id = x.order_id AND p.sequence < x.sequence AND p.status = 'pending'
        ORDER BY p.sequence DESC LIMIT 1
    ) p
), parked AS (
    UPDATE event_deliveries d SET next_attempt_at = GREATEST(b.until, now() + make_interval(secs => $3::float8))
    FROM behind b WHERE d.id = b.id
), c AS (
    SELECT d.id FROM due x JOIN event_deliveries d ON d.id = x.id
    WHERE d.status = 'pending' AND d.next_attempt_at <= now()  -- again, on the row as locked
      AND x.id NOT IN (SELECT id FROM behind)
      AND NOT EXISTS (SELECT 1 FROM order_events q WHERE q.order_id = x.order_id AND q.sequence < x.sequence
                          AND {_NOT_FANNED_OUT})
    ORDER BY x.next_attempt_at, x.id LIMIT $2 FOR UPDATE OF d SKIP LOCKED
)
UPDATE event_deliveries d SET next_attempt_at = now() + make_interval(secs => $3::float8),
    attempts = d.attempts + 1, last_attempt_at = now()
FROM c, order_events e, event_sinks s
WHERE d.id = c.id AND e.id = d.event_row AND s.id = d.sink_id
RETURNING d.id, d.sink_id, d.attempts, s.url, s.secret,
          e.id AS event_row, e.event_id, e.order_id, e.sequence, e.type, e.data, e.created_at
"""


async def claim(conn: PoolOrConn, *, kind: str, limit: int, lease_s: float) -> list[asyncpg.Record]:
    return await conn.fetch(_CLAIM, kind, limit, lease_s)


@dataclass(frozen=True, slots=True)
class Outcome:
    delivery_id: int
    sink_id: uuid.UUID
    ok: bool
    retry_in_s: float
    response_code: int | None = None
    latency_ms: int | None = None
    error: str | None = None


# One statement: the outcomes; the later deliveries of each outcome's order, which wait for its next try when it
# failed and are due at once when it is finished; and each webhook endpoint's health. A relay at a low priority
# may wait long for the CPU between two statements, and must hold no lock meanwhile (an admin's PATCH of the
# endpoint).
# Health: any success clears the endpoint's failing mark; one that has failed since longer than the bound is
# disabled (its pending deliveries then wait for an admin to resume it).
_RECORD = """
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::bool[], $3::int[], $4::int[], $5::text[], $6::float8[], $7::uuid[])
        AS r(id, ok, code, latency, error, delay, sink)
), delivered AS (
    UPDATE event_deliveries d SET
        status = CASE WHEN r.ok THEN 'delivered'
                      WHEN now() + make_interval(secs => r.delay) > d.give_up_at THEN 'failed' ELSE 'pending' END,
        finished_at = CASE WHEN r.ok OR now() + make_interval(secs => r.delay) > d.give_up_at THEN now() END,
        next_attempt_at = CASE WHEN r.ok THEN d.next_attempt_at ELSE now() + make_interval(secs => r.delay) END,
        response_code = r.code, latency_ms = r.latency, last_error = r.error
    FROM r WHERE d.id = r.id
    RETURNING d.sink_id, d.order_id, d.sequence, d.status, d.next_attempt_at
), behind AS (
    UPDATE event_deliveries n SET next_attempt_at = CASE WHEN f.status = 'pending'
                                                         THEN GREATEST(n.next_attempt_at, f.next_attempt_at)
                                                         ELSE now() END
    FROM delivered f CROSS JOIN LATERAL (
        SELECT p.id FROM event_deliveries p
        WHERE p.sink_id = f.sink_id AND p.order_id = f.order_id AND p.sequence > f.sequence AND p.status = 'pending'
        ORDER BY p.sequence
    ) later
    WHERE n.id = later.id AND (f.status = 'pending' OR n.next_attempt_at > now())
)
UPDATE event_sinks s SET
    failing_since = CASE WHEN h.ok THEN NULL ELSE COALESCE(s.failing_since, now()) END,
    status = CASE WHEN NOT h.ok AND s.status = 'active'
                       AND s.failing_since < now() - make_interval(secs => $8::float8) THEN 'disabled'
                  ELSE s.status END,
    updated_at = now()
FROM (SELECT sink, bool_or(ok) AS ok FROM r GROUP BY sink) h
WHERE s.id = h.sink AND s.kind = 'webhook'
"""


async def record(conn: PoolOrConn, outcomes: Sequence[Outcome], *, disable_after_s: float) -> None:
    if not outcomes:
        return
    await conn.execute(
        _RECORD,
        [o.delivery_id for o in outcomes], [o.ok for o in outcomes], [o.response_code for o in outcomes],
        [o.latency_ms for o in outcomes], [o.error for o in outcomes], [o.retry_in_s for o in outcomes],
        [o.sink_id for o in outcomes], disable_after_s,
    )


LAG = f"""SELECT EXTRACT(EPOCH FROM now() - LEAST(
    (SELECT min(created_at) FROM (SELECT created_at FROM order_events q WHERE {_NOT_FANNED_OUT}
                                  ORDER BY txid, id LIMIT 100) AS next),
    (SELECT min(d.event_at) FROM event_deliveries d JOIN event_sinks s ON s.id = d.sink_id
     WHERE d.status = 'pending' AND s.status = 'active')))"""
# A statement without parameters keeps the plan of its first run on a connection. Planned on a nearly empty outbox
# (a new database: the benchmark, a first sale), that plan read the whole table and sorted it, and kept doing so as
# the outbox grew: 15-70 ms a look, each second in every web worker and in the relay, on PostgreSQL's core while
# it commits the orders (each look stalled the creates in flight). Walking the index in order is cheap at any size.
INDEX_ORDER_ONLY = "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off"


async def lag_seconds(pool: PgPool) -> float:
    """Age of the oldest event some active sink has not received yet (0 when all are out)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(INDEX_ORDER_ONLY)
        lag = await conn.fetchval(LAG)
    return max(0.0, float(lag or 0))


async def last_event_id(conn: PoolOrConn) -> int:
    """The newest event's id (0 when there is none): two looks a second apart tell how fast events are written."""
    return int(await conn.fetchval("SELECT COALESCE(max(id), 0) FROM order_events"))


async def purge(conn: PoolOrConn, *, retention_s: float, limit: int) -> int:
    """Finished deliveries past the retention period. The events themselves are the order history (I5): kept."""
    result = await conn.execute(
        """DELETE FROM event_deliveries WHERE id IN (
               SELECT id FROM event_deliveries
               WHERE status <> 'pending' AND finished_at < now() - make_interval(secs => $1::float8) LIMIT $2)""",
        retention_s, limit,
    )
    return int(result.split()[-1])


# ---- webhook endpoints ------------------------------------------------------------------------------------

_SINK_COLUMNS = "id, url, event_types, description, status, failing_since, created_at, updated_at"


@dataclass(frozen=True, slots=True)
class NewEndpoint:
    endpoint_id: uuid.UUID
    url: str
    secret: str
    event_types: Sequence[str] | None
    description: str | None


async def insert_endpoint(conn: PoolOrConn, new: NewEndpoint) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""INSERT INTO event_sinks (id, kind, url, secret, event_types, description)
            VALUES ($1, 'webhook', $2, $3, $4, $5) RETURNING {_SINK_COLUMNS}""",
        new.endpoint_id, new.url, new.secret, new.event_types, new.description,
    )
    assert row is not None
    return row  # type: ignore[no-any-return]


async def endpoints(conn: PoolOrConn) -> list[asyncpg.Record]:
    return await conn.fetch(f"SELECT {_SINK_COLUMNS} FROM event_sinks WHERE kind = 'webhook' ORDER BY created_at")


async def endpoint(conn: PoolOrConn, endpoint_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_SINK_COLUMNS} FROM event_sinks WHERE id = $1 AND kind = 'webhook'", endpoint_id
    )


# Only the fields given change (NULL keeps the stored value); event_types has its own flag, as NULL means "all".
_UPDATE_ENDPOINT = f"""
UPDATE event_sinks SET
    url = COALESCE($2, url), secret = COALESCE($3, secret), description = COALESCE($4, description),
    event_types = CASE WHEN $5 THEN $6 ELSE event_types END,
    status = COALESCE($7, status),
    failing_since = CASE WHEN $7 = 'active' THEN NULL ELSE failing_since END,
    updated_at = now()
WHERE id = $1 AND kind = 'webhook'
RETURNING {_SINK_COLUMNS}
"""


@dataclass(frozen=True, slots=True)
class EndpointChange:
    url: str | None = None
    secret: str | None = None
    description: str | None = None
    set_event_types: bool = False
    event_types: Sequence[str] | None = None
    status: str | None = None


async def update_endpoint(conn: PoolOrConn, endpoint_id: uuid.UUID, change: EndpointChange) -> asyncpg.Record | None:
    return await conn.fetchrow(
        _UPDATE_ENDPOINT, endpoint_id, change.url, change.secret, change.description,
        change.set_event_types, change.event_types, change.status,
    )


async def delete_endpoint(conn: PoolOrConn, endpoint_id: uuid.UUID) -> bool:
    result = await conn.execute("DELETE FROM event_sinks WHERE id = $1 AND kind = 'webhook'", endpoint_id)
    return result.split()[-1] == "1"


_DELIVERY_COLUMNS = f"""d.id, e.event_id, {_FULL_TYPE} AS type, d.order_id, d.sequence, d.status, d.attempts,
    d.response_code, d.latency_ms, d.last_error, d.last_attempt_at,
    CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at, d.created_at, d.finished_at"""


async def deliveries(
    conn: PoolOrConn, endpoint_id: uuid.UUID, *, before: int | None, limit: int
) -> list[asyncpg.Record]:
    """Newest first, a page before the delivery id given."""
    return await conn.fetch(
        f"""SELECT {_DELIVERY_COLUMNS} FROM event_deliveries d JOIN order_events e ON e.id = d.event_row
            WHERE d.sink_id = $1 AND ($2::bigint IS NULL OR d.id < $2) ORDER BY d.id DESC LIMIT $3""",
        endpoint_id, before, limit,
    )


async def retry(
    conn: PoolOrConn, endpoint_id: uuid.UUID, delivery_id: int, *, retry_for_s: float
) -> asyncpg.Record | None:
    """Due again at once, with a new retry period (a delivered one is sent again too)."""
    return await conn.fetchrow(
        f"""WITH d AS (
                UPDATE event_deliveries SET status = 'pending', next_attempt_at = now(), finished_at = NULL,
                    give_up_at = now() + make_interval(secs => $3::float8)
                WHERE id = $2 AND sink_id = $1 RETURNING *
            )
            SELECT {_DELIVERY_COLUMNS} FROM d JOIN order_events e ON e.id = d.event_row""",
        endpoint_id, delivery_id, retry_for_s,
    )


# ---- the pull feed ------------------------------------------------------------------------------------------

# Only events older than `settle_s` are listed: an event row commits within one statement timeout of its
# created_at or never, so by then no event with a smaller id can still appear behind a consumer's cursor.
_FEED = """
SELECT e.id, e.event_id, e.order_id, e.sequence, e.type, e.data, e.created_at FROM order_events e
WHERE e.id > $1 AND e.created_at < now() - make_interval(secs => $4::float8)
  AND ($3::text IS NULL OR e.order_id IN (SELECT id FROM orders WHERE user_id = $3))
ORDER BY e.id LIMIT $2
"""


async def feed(
    conn: PoolOrConn, *, after: int, limit: int, user_id: str | None, settle_s: float
) -> list[asyncpg.Record]:
    return await conn.fetch(_FEED, after, limit, user_id, settle_s)
