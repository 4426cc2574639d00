"""Product rules: creation loads stock into Redis; any change rebuilds it behind the epoch fence."""

from __future__ import annotations

from typing import Any

import asyncpg

from preorder.audit import repository as audit
from preorder.audit.actor import Actor
from preorder.db import PgConn, PgPool
from preorder.errors import BadRequest, Conflict, NotFound
from preorder.products import repository as repo
from preorder.products.schemas import ProductCreate, ProductOut, ProductPage, ProductPatch
from preorder.stock.service import Levels, Stock


def _out(row: asyncpg.Record, levels: Levels) -> ProductOut:
    data = dict(row)
    data["total_stock"] = levels.total
    return ProductOut(**data, reserved=levels.reserved, available=levels.available)


async def create(pool: PgPool, stock: Stock, body: ProductCreate, *, by: Actor) -> ProductOut:
    fields = body.model_dump()
    for name in ("deposit_amount", "deposit_credit"):  # a full plan has neither: stored as 0
        fields[name] = fields[name] or 0
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.insert(conn, fields)
        if row is None:
            raise Conflict(f"Product {body.id} already exists")
        await audit.record(conn, by.did("product.create", body.id, after=dict(row)))
    await stock.forget_unknown(body.id)  # a create for it a moment ago may have left it marked unknown
    await stock.ensure_loaded(body.id)
    return _out(row, await stock.levels(body.id))


async def get(pool: PgPool, stock: Stock, product_id: str) -> ProductOut:
    row = await repo.get(pool, product_id)
    if row is None:
        raise NotFound(f"Unknown product {product_id}")
    return _out(row, await stock.levels(product_id))


async def page(pool: PgPool, stock: Stock, *, cursor: str | None, limit: int) -> ProductPage:
    rows = await repo.page(pool, after=cursor, limit=limit + 1)
    items = [_out(r, await stock.levels(r["id"])) for r in rows[:limit]]
    return ProductPage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


async def patch(pool: PgPool, stock: Stock, product_id: str, body: ProductPatch, *, by: Actor) -> ProductOut:
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise BadRequest("Nothing to change")
    updated: list[asyncpg.Record] = []

    async def apply(conn: PgConn) -> None:  # runs with the product row locked
        await _check_stock_change(conn, product_id, changes)
        before = await repo.get(conn, product_id)
        updated.append(await repo.update(conn, product_id, changes))
        await audit.record(conn, by.did("product.update", product_id, before=dict(before or {}),
                                        after=dict(updated[0])))

    # Counters, window and limit live in Redis too: change and rebuild them under one new epoch.
    # A change that breaks the stored payment plan (a price at or below the deposit) fails its CHECK: 409.
    await stock.rebuild(product_id, apply=apply)
    return _out(updated[0], await stock.levels(product_id))


async def _check_stock_change(conn: PgConn, product_id: str, changes: dict[str, Any]) -> None:
    if "total_stock" not in changes:
        return
    reserved = await repo.live_reserved(conn, product_id)
    if changes["total_stock"] < reserved:
        raise Conflict(f"total_stock can't go below the {reserved} already reserved", reserved=reserved)
