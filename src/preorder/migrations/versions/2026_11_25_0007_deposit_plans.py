"""Deposit + balance presales and payments as recorded facts.

Products gain a payment plan (full, or deposit with a deposit amount, its credit against the balance, a deposit
window and a fixed balance window). Orders gain the statuses deposit_paid and forfeited, what is due in each
phase, what was paid and refunded, and who cancelled them. Every payment is a row with an outcome (applied to the
order, or refunded because the order could no longer take it); every refund is a row against its payment, pending
until an admin records the provider's refund reference.

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-25
"""

from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None

SCHEMA = """
    ALTER TABLE products
        ADD COLUMN payment_plan text NOT NULL DEFAULT 'full' CHECK (payment_plan IN ('full', 'deposit')),
        ADD COLUMN deposit_amount bigint NOT NULL DEFAULT 0,
        ADD COLUMN deposit_credit bigint NOT NULL DEFAULT 0,
        ADD COLUMN deposit_window_seconds integer NOT NULL DEFAULT 1800 CHECK (deposit_window_seconds > 0),
        ADD COLUMN balance_starts_at timestamptz,
        ADD COLUMN balance_ends_at timestamptz,
        ADD COLUMN deposit_refundable boolean NOT NULL DEFAULT false;

    -- The API refuses an inconsistent plan with a 400 first; this is the backstop for any other writer.
    ALTER TABLE products ADD CONSTRAINT products_payment_plan_consistent CHECK (
        (payment_plan = 'full' AND deposit_amount = 0 AND deposit_credit = 0
            AND balance_starts_at IS NULL AND balance_ends_at IS NULL)
        OR (payment_plan = 'deposit' AND deposit_amount > 0 AND deposit_amount < price_amount
            AND deposit_credit >= deposit_amount AND deposit_credit < price_amount
            AND balance_starts_at IS NOT NULL AND balance_ends_at > balance_starts_at
            AND (starts_at IS NULL OR balance_starts_at > starts_at)));

    ALTER TABLE orders DROP CONSTRAINT orders_status_check;

    ALTER TABLE orders ADD CONSTRAINT orders_status_check CHECK (status IN
        ('pending', 'deposit_paid', 'paid', 'shipped', 'completed', 'cancelled', 'forfeited'));

    -- Copied from the product at creation: what this order owes in each phase and until when, whatever later
    -- edits of the product do. balance_due = amount_due - credit x quantity (amount_due for a full-plan order).
    ALTER TABLE orders
        ADD COLUMN payment_plan text NOT NULL DEFAULT 'full',
        ADD COLUMN deposit_due bigint NOT NULL DEFAULT 0,
        ADD COLUMN balance_due bigint,
        ADD COLUMN balance_starts_at timestamptz,
        ADD COLUMN balance_ends_at timestamptz,
        ADD COLUMN deposit_refundable boolean NOT NULL DEFAULT false,
        ADD COLUMN paid bigint NOT NULL DEFAULT 0,
        ADD COLUMN refunded bigint NOT NULL DEFAULT 0,
        ADD COLUMN cancelled_by text CHECK (cancelled_by IN ('customer', 'admin', 'system'));

    UPDATE orders SET balance_due = amount_due, paid = COALESCE(amount_paid, 0),
        refunded = COALESCE((SELECT amount FROM refunds r WHERE r.order_id = orders.id), 0),
        cancelled_by = CASE WHEN status = 'cancelled' THEN 'customer' END;

    ALTER TABLE orders ALTER COLUMN balance_due SET NOT NULL;

    -- The sweeper's forfeiture scan: deposit-paid orders by the end of their balance window.
    CREATE INDEX orders_balance_due_idx ON orders (balance_ends_at) WHERE status = 'deposit_paid';

    -- The reconciler's index of settled orders (0002) must see forfeited ones too.
    DROP INDEX orders_settled_idx;

    CREATE INDEX orders_settled_idx ON orders (updated_at)
        WHERE status IN ('cancelled', 'forfeited', 'shipped', 'completed');

    CREATE TABLE payments (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        order_id   uuid NOT NULL REFERENCES orders (id),
        kind       text NOT NULL CHECK (kind IN ('deposit', 'balance', 'full')),
        reference  text NOT NULL UNIQUE,
        amount     bigint NOT NULL CHECK (amount > 0),
        currency   char(3) NOT NULL,
        -- applied: it moved the order on; refunded: the order could no longer take it, a refund was created.
        outcome    text NOT NULL CHECK (outcome IN ('applied', 'refunded')),
        actor      text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );

    CREATE INDEX payments_order_idx ON payments (order_id);

    INSERT INTO payments (order_id, kind, reference, amount, currency, outcome, actor, created_at)
        SELECT id, 'full', payment_reference, amount_paid, currency, 'applied', 'migration', updated_at
        FROM orders WHERE payment_reference IS NOT NULL AND amount_paid > 0;

    -- Refunds were one row per order (0001); now one row per refunded payment, with a status.
    ALTER TABLE refunds DROP CONSTRAINT refunds_pkey;

    ALTER TABLE refunds
        ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ADD COLUMN payment_id bigint REFERENCES payments (id),
        ADD COLUMN reason text NOT NULL DEFAULT 'order_cancelled',
        ADD COLUMN status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded')),
        ADD COLUMN provider_reference text,
        ADD COLUMN succeeded_at timestamptz;

    UPDATE refunds r SET payment_id = p.id FROM payments p WHERE p.reference = r.payment_reference;

    CREATE INDEX refunds_order_idx ON refunds (order_id)
"""


def upgrade() -> None:
    # One statement at a time (asyncpg prepares each); statements are separated by a blank line.
    for statement in SCHEMA.split(";\n\n"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP INDEX refunds_order_idx")
    op.execute("DELETE FROM refunds WHERE id NOT IN (SELECT min(id) FROM refunds GROUP BY order_id)")
    op.execute("ALTER TABLE refunds DROP COLUMN id, DROP COLUMN payment_id, DROP COLUMN reason, DROP COLUMN status, "
               "DROP COLUMN provider_reference, DROP COLUMN succeeded_at")
    op.execute("ALTER TABLE refunds ADD PRIMARY KEY (order_id)")
    op.execute("DROP TABLE payments")
    op.execute("DROP INDEX orders_settled_idx")
    op.execute("CREATE INDEX orders_settled_idx ON orders (updated_at) "
               "WHERE status IN ('cancelled', 'shipped', 'completed')")
    op.execute("DROP INDEX orders_balance_due_idx")
    op.execute("ALTER TABLE orders DROP COLUMN payment_plan, DROP COLUMN deposit_due, DROP COLUMN balance_due, "
               "DROP COLUMN balance_starts_at, DROP COLUMN balance_ends_at, DROP COLUMN deposit_refundable, "
               "DROP COLUMN paid, DROP COLUMN refunded, DROP COLUMN cancelled_by")
    op.execute("ALTER TABLE orders DROP CONSTRAINT orders_status_check")
    op.execute("ALTER TABLE orders ADD CONSTRAINT orders_status_check CHECK (status IN "
               "('pending', 'paid', 'shipped', 'completed', 'cancelled'))")
    op.execute("ALTER TABLE products DROP CONSTRAINT products_payment_plan_consistent")
    op.execute("ALTER TABLE products DROP COLUMN payment_plan, DROP COLUMN deposit_amount, "
               "DROP COLUMN deposit_credit, DROP COLUMN deposit_window_seconds, DROP COLUMN balance_starts_at, "
               "DROP COLUMN balance_ends_at, DROP COLUMN deposit_refundable")
