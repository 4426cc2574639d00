"""Index of orders whose hold must be settled (cancelled, shipped, completed) by the time they changed.

The reconciler's regular pass reads only the orders settled since its last pass (plus a margin), instead of
every live hold of every product.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX orders_settled_idx ON orders (updated_at) "
               "WHERE status IN ('cancelled', 'shipped', 'completed')")


def downgrade() -> None:
    op.execute("DROP INDEX orders_settled_idx")
