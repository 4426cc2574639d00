"""The sold counter's trigger also checks, under the product rows' locks, that no loader moved a product's stock
epoch since the inserting statement read it.

Order batches (orders/repository.py, _INSERT_MANY_LATE_LOCK) no longer lock their products before inserting: the
rows of concurrent batches go in side by side, and a product row is locked only by this trigger, at the end of
the statement, for the counter update and the commit. The statement leaves the epochs it fenced its rows with in
the transaction-local setting `preorder.batch_epochs`; this trigger compares them with the locked rows' newest
versions (a loader that committed meanwhile is seen), and the batch's earliest write deadline
(`preorder.batch_deadline`) with the clock after the lock wait, and raises PR409; and the CHECK on `sold` still
refuses a batch Redis over-granted; either way the statement writes nothing and the batch is written again by the
statement that locks first.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_UPDATE_SOLD = """
        UPDATE products p SET sold = p.sold + d.units
        FROM (SELECT product_id, SUM(quantity) AS units FROM new_rows
              WHERE order_holds_stock(status) GROUP BY product_id) d
        WHERE p.id = d.product_id;
        RETURN NULL;
    END
    $fn$"""

CHECKING = """
    CREATE OR REPLACE FUNCTION orders_sold_after_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
    DECLARE
        seen text := current_setting('preorder.batch_epochs', true);
        deadline text := current_setting('preorder.batch_deadline', true);
    BEGIN
        -- In id order, as every order write locks them: no deadlock.
        PERFORM 1 FROM products WHERE id IN (SELECT product_id FROM new_rows) ORDER BY id FOR NO KEY UPDATE;
        IF seen IS NOT NULL AND seen <> '' THEN
            PERFORM set_config('preorder.batch_epochs', '', true);  -- this statement's, consumed
            PERFORM set_config('preorder.batch_deadline', '', true);
            -- A new snapshot (READ COMMITTED, a volatile function): the locked rows as last committed.
            IF EXISTS (SELECT 1 FROM jsonb_each_text(seen::jsonb) s JOIN products p ON p.id = s.key
                       WHERE p.stock_epoch <> s.value::bigint AND p.id IN (SELECT product_id FROM new_rows))
               OR clock_timestamp() >= deadline::timestamptz THEN
                RAISE EXCEPTION 'the stock was rebuilt, or a write deadline passed, while these orders were written'
                    USING ERRCODE = 'PR409';
            END IF;
        END IF;""" + _UPDATE_SOLD

PREVIOUS = """
    CREATE OR REPLACE FUNCTION orders_sold_after_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM 1 FROM products WHERE id IN (SELECT product_id FROM new_rows) ORDER BY id FOR NO KEY UPDATE;""" + (
    _UPDATE_SOLD)


def upgrade() -> None:
    op.execute(CHECKING)


def downgrade() -> None:
    op.execute(PREVIOUS)
