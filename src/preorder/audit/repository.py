"""All audit SQL. The table refuses UPDATE, DELETE and TRUNCATE (migration 0005): rows are only ever added."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from preorder.db import PgConn, PgPool


@dataclass(frozen=True, slots=True)
class Entry:
    actor: str  # the token's subject
    client: str  # the address the request came from
    action: str  # product.create, product.update, order.shipped, order.cancelled, ...
    target: str  # the product id or order id
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


async def record(conn: PgConn, entry: Entry) -> None:
    """Call it in the transaction that makes the change: the action and its record commit together. (The pool's
    jsonb codec encodes before/after.)"""
    await conn.execute(
        "INSERT INTO audit_log (actor, client, action, target, before, after) VALUES ($1, $2, $3, $4, $5, $6)",
        entry.actor, entry.client, entry.action, entry.target, entry.before, entry.after,
    )


async def page(pool: PgPool, *, before_id: int | None, target: str | None, limit: int) -> list[asyncpg.Record]:
    """Newest first; `before_id` is the last id of the previous page (keyset paging)."""
    return await pool.fetch(
        "SELECT id, at, actor, client, action, target, before, after "
        "FROM audit_log WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR target = $2) "
        "ORDER BY id DESC LIMIT $3",
        before_id, target, limit,
    )
