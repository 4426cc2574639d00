"""Product routes: public reads, admin writes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from preorder.audit.actor import AdminActor
from preorder.db import Pool
from preorder.deps import StockDep
from preorder.products import service
from preorder.products.schemas import ProductCreate, ProductOut, ProductPage, ProductPatch, ProductQuery
from preorder.responses import problems
from preorder.types import ID_PATTERN

router = APIRouter(prefix="/api/products", tags=["products"])
PathId = Annotated[str, Path(pattern=ID_PATTERN, examples=["P1001"])]


@router.post("", status_code=status.HTTP_201_CREATED, responses=problems(400, 401, 403, 409, 413, 503))
async def create_product(body: ProductCreate, pool: Pool, stock: StockDep, actor: AdminActor) -> ProductOut:
    return await service.create(pool, stock, body, by=actor)


@router.get("", responses=problems(400, 503))
async def list_products(pool: Pool, stock: StockDep, query: Annotated[ProductQuery, Query()]) -> ProductPage:
    return await service.page(pool, stock, cursor=query.cursor, limit=query.limit)


@router.get("/{product_id}", responses=problems(400, 404, 503))
async def get_product(product_id: PathId, pool: Pool, stock: StockDep) -> ProductOut:
    return await service.get(pool, stock, product_id)


@router.patch("/{product_id}", responses=problems(400, 401, 403, 404, 409, 413, 503))
async def patch_product(
    product_id: PathId, body: ProductPatch, pool: Pool, stock: StockDep, actor: AdminActor
) -> ProductOut:
    return await service.patch(pool, stock, product_id, body, by=actor)
