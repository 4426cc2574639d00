"""Events out: order_events becomes the transactional outbox; sinks and their deliveries.

Every order write already inserts its event row in the same statement. This adds what the relay needs to
publish it: a stable event id, the per-order sequence (1 = created), the event type, the order as it was after
the change (`data`), and `relayed_at`, set once the relay has queued the event for every sink. Only unrelayed
rows are in the partial index the relay reads, so it stays small whatever the history's size.

`event_sinks` are where events go: the NATS JetStream stream (one row, when configured) and the webhook
endpoints an admin registers. `event_deliveries` is one row per event and sink: the relay's bookkeeping
(attempts, next try, last answer), purged after the retention period. The history itself (I5) is never purged.

The create path pays one more index entry per event (the partial one; event_id is 122 random bits, unique
without an index, and nothing looks an event up by it). The index on (order_id, id) that served the history
becomes a unique one on (order_id, sequence): it serves the history the same way, makes a duplicate sequence
impossible, and the next sequence is read from it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


SCHEMA = """
    ALTER TABLE order_events
        ADD COLUMN event_id   uuid NOT NULL DEFAULT gen_random_uuid(),
        ADD COLUMN sequence   integer,
        ADD COLUMN type       text,
        ADD COLUMN data       jsonb,
        ADD COLUMN relayed_at timestamptz;

    -- Events written before this migration are history, not news: they are not published.
    UPDATE order_events e SET
        sequence = s.n,
        type = CASE WHEN e.from_status IS NULL THEN 'created' ELSE e.to_status END,
        relayed_at = now()
    FROM (SELECT id, row_number() OVER (PARTITION BY order_id ORDER BY id) AS n FROM order_events) s
    WHERE s.id = e.id;

    ALTER TABLE order_events ALTER COLUMN sequence SET NOT NULL, ALTER COLUMN type SET NOT NULL;

    CREATE UNIQUE INDEX order_events_order_seq_idx ON order_events (order_id, sequence);

    DROP INDEX order_events_order_idx;

    CREATE INDEX order_events_unrelayed_idx ON order_events (id) WHERE relayed_at IS NULL;

    -- A safety net for a writer that does not name the outbox columns (an older statement, a hand-written
    -- INSERT): the row still gets its sequence, type and, where the order is visible, its snapshot. The order
    -- writes of orders/repository.py set them themselves, so the WHEN clause keeps the function off their path.
    CREATE FUNCTION order_events_fill_outbox() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        NEW.sequence := (SELECT COALESCE(max(sequence), 0) + 1 FROM order_events WHERE order_id = NEW.order_id);
        NEW.type := COALESCE(NEW.type, CASE WHEN NEW.from_status IS NULL THEN 'created' ELSE NEW.to_status END);
        NEW.data := COALESCE(NEW.data, (SELECT to_jsonb(o) FROM orders o WHERE o.id = NEW.order_id));
        RETURN NEW;
    END
    $fn$;

    CREATE TRIGGER order_events_fill_outbox BEFORE INSERT ON order_events
        FOR EACH ROW WHEN (NEW.sequence IS NULL) EXECUTE FUNCTION order_events_fill_outbox();

    CREATE TABLE event_sinks (
        id            uuid PRIMARY KEY,
        kind          text NOT NULL CHECK (kind IN ('nats', 'webhook')),
        url           text NOT NULL,
        secret        text,
        event_types   text[],
        description   text,
        status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'disabled')),
        failing_since timestamptz,
        created_at    timestamptz NOT NULL DEFAULT now(),
        updated_at    timestamptz NOT NULL DEFAULT now()
    );

    CREATE UNIQUE INDEX event_sinks_one_nats_idx ON event_sinks (kind) WHERE kind = 'nats';

    CREATE TABLE event_deliveries (
        id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        sink_id         uuid NOT NULL REFERENCES event_sinks (id) ON DELETE CASCADE,
        event_row       bigint NOT NULL,
        order_id        uuid NOT NULL,
        sequence        integer NOT NULL,
        event_at        timestamptz NOT NULL,
        status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        give_up_at      timestamptz NOT NULL,
        last_attempt_at timestamptz,
        response_code   integer,
        latency_ms      integer,
        last_error      text,
        created_at      timestamptz NOT NULL DEFAULT now(),
        finished_at     timestamptz,
        UNIQUE (sink_id, event_row)
    );

    -- The relay's work lists hold only pending deliveries, so they stay small: what is due, and for each sink
    -- and order, which delivery is first in line (a later event waits while an earlier one is retried).
    CREATE INDEX event_deliveries_due_idx ON event_deliveries (next_attempt_at) WHERE status = 'pending';

    CREATE INDEX event_deliveries_line_idx ON event_deliveries (sink_id, order_id, sequence)
        WHERE status = 'pending';

    CREATE INDEX event_deliveries_finished_idx ON event_deliveries (finished_at) WHERE status <> 'pending'
"""


def upgrade() -> None:
    # One statement at a time: asyncpg prepares each, and a prepared statement holds exactly one.
    for statement in SCHEMA.split(";\n\n"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE event_deliveries, event_sinks")
    op.execute("DROP TRIGGER order_events_fill_outbox ON order_events")
    op.execute("DROP FUNCTION order_events_fill_outbox()")
    op.execute("CREATE INDEX order_events_order_idx ON order_events (order_id, id)")
    op.execute("DROP INDEX order_events_order_seq_idx")
    op.execute("ALTER TABLE order_events DROP COLUMN event_id, DROP COLUMN sequence, DROP COLUMN type, "
               "DROP COLUMN data, DROP COLUMN relayed_at")
