"""The SQL the stock protocol needs: the loader's fenced snapshot, and order statuses for the reconciler."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from preorder.db import PgConn, PgPool
from preorder.status import DROPPED, LIVE, RELEASED, sql_list


@dataclass(frozen=True, slots=True)
class Snapshot:
    epoch: int
    total: int
    starts_at: datetime | None
    ends_at: datetime | None
    per_user_limit: int | None
    # orders holding stock (not cancelled or forfeited): id, user_id, quantity, status, created_at
    live: list[asyncpg.Record]


async def lock_product(conn: PgConn, product_id: str) -> asyncpg.Record | None:
    # FOR UPDATE conflicts with the FOR KEY SHARE every order write takes: writes wait for the loader.
    return await conn.fetchrow("SELECT id FROM products WHERE id = $1 FOR UPDATE", product_id)


async def bump_epoch_and_snapshot(conn: PgConn, product_id: str) -> Snapshot:
    """Call inside the transaction that holds lock_product: bump the fence, then sum the orders."""
    p = await conn.fetchrow(
        """UPDATE products SET stock_epoch = stock_epoch + 1 WHERE id = $1
           RETURNING stock_epoch, total_stock, starts_at, ends_at, per_user_limit""",
        product_id,
    )
    assert p is not None
    live = await conn.fetch(
        """SELECT id, user_id, quantity, status, created_at FROM orders
           WHERE product_id = $1 AND order_holds_stock(status)""",
        product_id,
    )
    return Snapshot(p["stock_epoch"], p["total_stock"], p["starts_at"], p["ends_at"], p["per_user_limit"], live)


async def stock_epoch(pool: PgPool, product_id: str) -> int | None:
    value = await pool.fetchval("SELECT stock_epoch FROM products WHERE id = $1", product_id)
    return None if value is None else int(value)


async def order_statuses(conn: PgConn | PgPool, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    rows = await conn.fetch(_BY_KEY.format(ids="$1::uuid[]", only="status IS NOT NULL"), ids)
    return {r["id"]: r["status"] for r in rows}


# Of a page of order ids (the text of Redis's members, joined by commas): those without a row, or whose status gave
# the stock back or kept it sold. The other orders keep their holds, and nothing about them comes back: a page
# costs one string and a statement, not a uuid.UUID and a row per order (measured: that was most of the pass).
# Each id is looked up by itself (a subquery per id, which PostgreSQL cannot turn into a join; order_statuses
# too): as a join, or as `id = ANY(ids)`, the
# planner read and hashed the whole orders table for 1,000 ids whenever its statistics put the table under
# 100,000-200,000 rows (100-190 ms a page in the benchmark, against ~5 ms by the primary key), and a connection
# can keep such a plan as the table grows.
_BY_KEY = """
    WITH page AS MATERIALIZED (
        SELECT f.id, (SELECT o.status FROM orders o WHERE o.id = f.id) AS status FROM unnest({ids}) AS f(id)
    )
    SELECT id, status FROM page WHERE {only}"""
NOT_LIVE = _BY_KEY.format(ids="string_to_array($1::text, ',')::uuid[]",
                          only=f"status IS NULL OR status NOT IN {sql_list(LIVE)}")


async def not_live(conn: PgConn | PgPool, joined_ids: str) -> list[asyncpg.Record]:
    """(id, status) of the orders that are not live, status None when there is no order."""
    return await conn.fetch(NOT_LIVE, joined_ids)


async def epochs(pool: PgPool) -> list[asyncpg.Record]:
    """Per product: its stock epoch and the units its orders hold (the sold counter, migration 0003)."""
    return await pool.fetch("SELECT id, stock_epoch, sold FROM products ORDER BY id")


async def sold(pool: PgPool, product_id: str) -> int:
    return int(await pool.fetchval("SELECT sold FROM products WHERE id = $1", product_id) or 0)


async def database_now(pool: PgPool) -> datetime:
    now: datetime = await pool.fetchval("SELECT now()")
    return now


_SETTLED = sql_list(RELEASED + DROPPED)  # the orders_settled_idx predicate (migrations 0002, 0007)
_FIRST = uuid.UUID(int=0)


async def settled_since(
    pool: PgPool, since: datetime, *, after: tuple[datetime, uuid.UUID] | None, limit: int = 1000
) -> list[asyncpg.Record]:
    """Orders cancelled, forfeited, shipped or completed since then, in (updated_at, id) order, the page
    after `after`."""
    at, order_id = after or (since, _FIRST)
    return await pool.fetch(
        f"""SELECT id, product_id, status, updated_at FROM orders
            WHERE status IN {_SETTLED} AND (updated_at, id) > ($1, $2) ORDER BY updated_at, id LIMIT $3""",
        at, order_id, limit)


async def live_totals(pool: PgPool) -> list[asyncpg.Record]:
    """Per product: total_stock, stock_epoch and the units its orders hold (for reconcile)."""
    return await pool.fetch("SELECT id, total_stock, stock_epoch, sold AS reserved FROM products ORDER BY id")
