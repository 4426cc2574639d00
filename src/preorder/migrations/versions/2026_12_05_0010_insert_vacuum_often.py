"""Autovacuum takes the orders and their events every 20,000 new rows, not every fifth of the table.

Both tables only grow during a sale. PostgreSQL vacuums a growing table once the rows inserted since its last vacuum
pass a fifth of its size (`autovacuum_vacuum_insert_scale_factor` 0.2), so on a table of millions that vacuum
comes minutes of orders later, and marks all those pages visible at once. Each page it touches for the first time
since the last checkpoint is written to the WAL whole (a full-page image; data checksums are on): in the 5-minute
sustained run of `make bench` (2026-12-05 01:35, 7358507) one minute logged 303,712 of them, 2,463 MB of WAL
(18.3 kB an order against 2 kB), and create fell from 4,336 to 2,296 req/s with its INSERT at 12.1 ms, the minute
both tables' vacuums ran. Vacuumed every 20,000 rows (every naptime, a minute, under load), each pass finds only
the pages of the last minute, most of them already written whole since the last checkpoint by the inserts
themselves: 9,557-21,415 full-page images a minute in that scenario run on its own, and no such minute. The next full
run (1c98732) still logged one minute of 271,743, which did not slow it (4,475 req/s): that the vacuum minute is
gone for good is not shown.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TABLES = ("orders", "order_events")
OPTIONS = "autovacuum_vacuum_insert_threshold = 20000, autovacuum_vacuum_insert_scale_factor = 0"


def upgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET ({OPTIONS})")


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} RESET (autovacuum_vacuum_insert_threshold, "
                   "autovacuum_vacuum_insert_scale_factor)")
