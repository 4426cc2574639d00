"""Products, orders, their event log, idempotency records and refunds.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


SCHEMA = """
    CREATE TABLE products (
        id                     text PRIMARY KEY,
        name                   text NOT NULL,
        price_amount           bigint NOT NULL CHECK (price_amount >= 0),
        currency               char(3) NOT NULL,
        total_stock            integer NOT NULL CHECK (total_stock >= 0),
        starts_at              timestamptz,
        ends_at                timestamptz,
        ships_at               timestamptz,
        per_user_limit         integer CHECK (per_user_limit > 0),
        payment_window_seconds integer NOT NULL DEFAULT 900 CHECK (payment_window_seconds > 0),
        -- Bumped by every stock rebuild, and re-checked by every order write (the fence of DESIGN.md section 3).
        stock_epoch            bigint NOT NULL DEFAULT 0,
        created_at             timestamptz NOT NULL DEFAULT now(),
        updated_at             timestamptz NOT NULL DEFAULT now(),
        CHECK (starts_at IS NULL OR ends_at IS NULL OR ends_at > starts_at)
    );

    CREATE TABLE orders (
        id                uuid PRIMARY KEY,
        product_id        text NOT NULL REFERENCES products (id),
        user_id           text NOT NULL,
        quantity          integer NOT NULL CHECK (quantity > 0),
        status            text NOT NULL
                          CHECK (status IN ('pending', 'paid', 'shipped', 'completed', 'cancelled')),
        amount_due        bigint NOT NULL CHECK (amount_due >= 0),
        currency          char(3) NOT NULL,
        payment_reference text UNIQUE,
        amount_paid       bigint,
        pay_by            timestamptz NOT NULL,
        created_at        timestamptz NOT NULL,
        updated_at        timestamptz NOT NULL
    );
    CREATE INDEX orders_user_idx ON orders (user_id, id DESC);
    CREATE INDEX orders_product_idx ON orders (product_id, id DESC);
    CREATE INDEX orders_pending_due_idx ON orders (pay_by) WHERE status = 'pending';

    CREATE TABLE order_events (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        order_id    uuid NOT NULL REFERENCES orders (id),
        from_status text,
        to_status   text NOT NULL,
        actor       text NOT NULL,
        reason      text NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE INDEX order_events_order_idx ON order_events (order_id, id);

    CREATE TABLE idempotency_keys (
        user_id     text NOT NULL,
        key         text NOT NULL,
        fingerprint text NOT NULL,
        order_id    uuid NOT NULL REFERENCES orders (id),
        created_at  timestamptz NOT NULL DEFAULT now(),
        expires_at  timestamptz NOT NULL,
        PRIMARY KEY (user_id, key)
    );
    CREATE INDEX idempotency_keys_expiry_idx ON idempotency_keys (expires_at);

    CREATE TABLE refunds (
        order_id          uuid PRIMARY KEY REFERENCES orders (id),
        amount            bigint NOT NULL CHECK (amount >= 0),
        currency          char(3) NOT NULL,
        payment_reference text NOT NULL,
        created_at        timestamptz NOT NULL DEFAULT now()
    );
"""


def upgrade() -> None:
    # One statement at a time: asyncpg prepares each, and a prepared statement holds exactly one.
    for statement in SCHEMA.split(";"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE refunds, idempotency_keys, order_events, orders, products")
