"""PostgreSQL as the last word on I1: a per-product `sold` counter that can never pass `total_stock`.

Redis answers every reservation, but Redis can go back in time (an asynchronous replica promoted, a restore
from a snapshot, an AOF that lost its last second) with its keys present and acknowledged holds missing; the
epoch fence cannot see that. So `products.sold` counts the units of the product's orders that hold stock,
kept by statement-level triggers (one UPDATE per statement, whatever the number of rows, on every path that
writes orders), and a CHECK refuses any statement that would take it past `total_stock`. The order writes
read it under the product row lock and insert only the rows that fit (orders/repository.py), so the CHECK is
the backstop, not the normal refusal.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


SCHEMA = """
    -- The statuses whose units are taken from the product's stock (the complement of the release statuses).
    CREATE FUNCTION order_holds_stock(status text) RETURNS boolean
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT status NOT IN ('cancelled', 'forfeited') $$;

    ALTER TABLE products ADD COLUMN sold integer NOT NULL DEFAULT 0;

    UPDATE products p SET sold = COALESCE(
        (SELECT SUM(o.quantity) FROM orders o WHERE o.product_id = p.id AND order_holds_stock(o.status)), 0);

    ALTER TABLE products ADD CONSTRAINT products_sold_within_stock CHECK (sold >= 0 AND sold <= total_stock);

    -- Product rows are locked in id order, as the order writes lock them, so two statements touching the same
    -- products can never deadlock.
    CREATE FUNCTION orders_sold_after_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM 1 FROM products WHERE id IN (SELECT product_id FROM new_rows) ORDER BY id FOR NO KEY UPDATE;
        UPDATE products p SET sold = p.sold + d.units
        FROM (SELECT product_id, SUM(quantity) AS units FROM new_rows
              WHERE order_holds_stock(status) GROUP BY product_id) d
        WHERE p.id = d.product_id;
        RETURN NULL;
    END
    $fn$;

    CREATE TRIGGER orders_sold_insert AFTER INSERT ON orders
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION orders_sold_after_insert();

    CREATE FUNCTION orders_sold_after_update() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM 1 FROM products WHERE id IN (SELECT product_id FROM new_rows) ORDER BY id FOR NO KEY UPDATE;
        UPDATE products p SET sold = p.sold + d.units
        FROM (SELECT n.product_id,
                     SUM(CASE WHEN order_holds_stock(n.status) THEN n.quantity ELSE 0 END
                         - CASE WHEN order_holds_stock(o.status) THEN o.quantity ELSE 0 END) AS units
              FROM new_rows n JOIN old_rows o ON o.id = n.id GROUP BY n.product_id) d
        WHERE p.id = d.product_id AND d.units <> 0;
        RETURN NULL;
    END
    $fn$;

    CREATE TRIGGER orders_sold_update AFTER UPDATE ON orders
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION orders_sold_after_update()
"""


def upgrade() -> None:
    # One statement at a time (asyncpg prepares each). The function bodies hold semicolons, so split on the
    # blank line that ends each statement instead.
    for statement in SCHEMA.split(";\n\n"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER orders_sold_update ON orders")
    op.execute("DROP TRIGGER orders_sold_insert ON orders")
    op.execute("DROP FUNCTION orders_sold_after_update(), orders_sold_after_insert()")
    op.execute("ALTER TABLE products DROP COLUMN sold")
    op.execute("DROP FUNCTION order_holds_stock(text)")
