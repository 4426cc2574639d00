"""All product SQL."""

from __future__ import annotations

from typing import Any

import asyncpg

from preorder.db import PgConn, PgPool

_COLUMNS = (
    "id, name, price_amount, currency, total_stock, starts_at, ends_at, ships_at, per_user_limit, "
    "payment_window_seconds, payment_plan, deposit_amount, deposit_credit, deposit_window_seconds, "
    "balance_starts_at, balance_ends_at, deposit_refundable, created_at, updated_at"
)
PATCHABLE = (
    "name", "price_amount", "currency", "total_stock", "starts_at", "ends_at", "ships_at",
    "per_user_limit", "payment_window_seconds",
)


async def insert(pool: PgPool | PgConn, fields: dict[str, Any]) -> asyncpg.Record | None:
    """None when the id is taken."""
    names = list(fields)
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    return await pool.fetchrow(
        f"INSERT INTO products ({', '.join(names)}) VALUES ({placeholders}) "
        f"ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
        *fields.values(),
    )


async def get(pool: PgPool | PgConn, product_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(f"SELECT {_COLUMNS} FROM products WHERE id = $1", product_id)


async def page(pool: PgPool, *, after: str | None, limit: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        f"SELECT {_COLUMNS} FROM products WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2", after, limit
    )


async def live_reserved(conn: PgConn, product_id: str) -> int:
    """The units the product's orders hold: the sold counter its triggers keep (migration 0003)."""
    return int(await conn.fetchval("SELECT sold FROM products WHERE id = $1", product_id) or 0)


async def update(conn: PgConn, product_id: str, changes: dict[str, Any]) -> asyncpg.Record:
    names = [n for n in changes if n in PATCHABLE]
    sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(names, start=2))
    row = await conn.fetchrow(
        f"UPDATE products SET {sets}, updated_at = now() WHERE id = $1 RETURNING {_COLUMNS}",
        product_id,
        *(changes[n] for n in names),
    )
    assert row is not None
    return row  # type: ignore[no-any-return]


async def live_ids(pool: PgPool, *, limit: int) -> list[str]:
    """Products whose presale window is open now (NULL ends are open)."""
    rows = await pool.fetch(
        "SELECT id FROM products WHERE (starts_at IS NULL OR starts_at <= now()) "
        "AND (ends_at IS NULL OR ends_at > now()) ORDER BY id LIMIT $1", limit,
    )
    return [r["id"] for r in rows]
