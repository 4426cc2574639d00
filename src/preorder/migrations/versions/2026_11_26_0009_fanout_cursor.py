"""The relay's fan-out reads the outbox through one cursor instead of marking every event it has queued.

Marking was a second write of every event row, and not a HOT one (`relayed_at` decided the row's place in a partial
index), made even with no sink configured: with the relay on and no sink, create's p99 at 64 connections rose from
17-18 ms to 40-50 ms by the second round of `make bench`, where it held with the relay off.

Each event row now carries the id of the transaction that wrote it (`txid`, by default). The fan-out takes the
events after its cursor in (txid, id) order, but only those of transactions older than every transaction still
running (its snapshot's xmin): none of those can commit any more, so no event can appear behind the cursor later.
One statement queues a batch for the sinks and moves the cursor, whose row it takes FOR UPDATE SKIP LOCKED:
relays in several processes take turns. A transaction left open holds the fan-out back (the lag shows it); it
loses nothing. Events not yet relayed when this runs are put after the cursor.

The relay's claim reads each active sink's due deliveries in the order it sends them, up to its batch: the due
index becomes (sink_id, next_attempt_at, id). The claim read every due delivery of every sink and sorted them
(115 ms for a batch of 64 under a backlog of 50,000, on PostgreSQL's core), so a backlog made itself worse.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

SCHEMA = """
    ALTER TABLE order_events ADD COLUMN txid xid8 NOT NULL DEFAULT '0';

    UPDATE order_events SET txid = '1' WHERE relayed_at IS NULL;

    ALTER TABLE order_events ALTER COLUMN txid SET DEFAULT pg_current_xact_id();

    DROP INDEX order_events_unrelayed_idx;

    ALTER TABLE order_events DROP COLUMN relayed_at;

    CREATE INDEX order_events_fanout_idx ON order_events (txid, id);

    CREATE TABLE event_fanout (
        singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        txid       xid8 NOT NULL,
        id         bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );

    INSERT INTO event_fanout (txid, id) VALUES ('0', 9223372036854775807);

    DROP INDEX event_deliveries_due_idx;

    CREATE INDEX event_deliveries_due_idx ON event_deliveries (sink_id, next_attempt_at, id) WHERE status = 'pending'
"""


def upgrade() -> None:
    for statement in SCHEMA.split(";\n\n"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP INDEX event_deliveries_due_idx")
    op.execute("CREATE INDEX event_deliveries_due_idx ON event_deliveries (next_attempt_at) WHERE status = 'pending'")
    op.execute("ALTER TABLE order_events ADD COLUMN relayed_at timestamptz")
    op.execute("UPDATE order_events e SET relayed_at = now() FROM event_fanout f "
               "WHERE (e.txid, e.id) <= (f.txid, f.id)")
    op.execute("CREATE INDEX order_events_unrelayed_idx ON order_events (id) WHERE relayed_at IS NULL")
    op.execute("DROP TABLE event_fanout")
    op.execute("ALTER TABLE order_events DROP COLUMN txid")
