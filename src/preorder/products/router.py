"""Product routes: public reads, admin writes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from preorder.audit.actor import AdminActor
from preorder.db import Pool
from preorder.deps import StockDep
from preorder.errors import (
    BadRequest,
    Conflict,
    ConstraintViolated,
    Forbidden,
    MalformedBody,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from preorder.products import service
from preorder.products.schemas import ProductCreate, ProductOut, ProductPage, ProductPatch, ProductQuery
from preorder.responses import problems
from preorder.types import ID_PATTERN

router = APIRouter(prefix="/api/products", tags=["products"])
PathId = Annotated[str, Path(pattern=ID_PATTERN, examples=["P1001"])]


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a product",
             responses=problems(ValidationFailed, MalformedBody, Unauthorized, Forbidden, Conflict, PayloadTooLarge,
                                Unavailable))
async def create_product(body: ProductCreate, pool: Pool, stock: StockDep, actor: AdminActor) -> ProductOut:
    """**Who may call:** admins.

    **Changes:** adds the product with its stock, price, presale window and per-customer limit, and loads its
    stock into Redis; 409 if the id exists. Written to the audit log."""
    return await service.create(pool, stock, body, by=actor)


@router.get("", summary="List products", responses=problems(ValidationFailed, Unavailable))
async def list_products(pool: Pool, stock: StockDep, query: Annotated[ProductQuery, Query()]) -> ProductPage:
    """**Who may call:** anyone (no token).

    **Changes:** nothing. Products by id with live stock (total, reserved, available); pass `next_cursor` back
    as `cursor` for the next page."""
    return await service.page(pool, stock, cursor=query.cursor, limit=query.limit)


@router.get("/{product_id}", summary="Read one product", responses=problems(ValidationFailed, NotFound, Unavailable))
async def get_product(product_id: PathId, pool: Pool, stock: StockDep) -> ProductOut:
    """**Who may call:** anyone (no token).

    **Changes:** nothing. The product with its live stock: total, reserved, available, and its presale window."""
    return await service.get(pool, stock, product_id)


@router.patch("/{product_id}", summary="Change a product",
              responses=problems(ValidationFailed, MalformedBody, BadRequest, Unauthorized, Forbidden, NotFound,
                                 Conflict, ConstraintViolated, PayloadTooLarge, Unavailable))
async def patch_product(
    product_id: PathId, body: ProductPatch, pool: Pool, stock: StockDep, actor: AdminActor
) -> ProductOut:
    """**Who may call:** admins.

    **Changes:** the fields sent (null clears the window, ship date and limit); the stock can't go below what is
    reserved (409). Redis is rebuilt under a new epoch in the same step. Written to the audit log with the
    product before and after."""
    return await service.patch(pool, stock, product_id, body, by=actor)
