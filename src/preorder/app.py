"""create_app(): the lifespan opens PostgreSQL and Redis and loads the scripts; routers and handlers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from preorder import __version__, cache, db, errors
from preorder.audit.router import router as audit_router
from preorder.auth import TokenVerifier
from preorder.events.relay import Relay
from preorder.events.router import declare_webhooks
from preorder.events.router import router as events_router
from preorder.events.service import Events
from preorder.middleware import BodyLimit
from preorder.orders.router import router as orders_router
from preorder.orders.service import Orders
from preorder.products.router import router as products_router
from preorder.responses import Problem, problems
from preorder.service_routes import router as service_router
from preorder.settings import Settings, get_settings
from preorder.stock.customers import CustomerRules
from preorder.stock.service import RateLimits, Stock, StockRules
from preorder.workers.loops import run_forever


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    pool = await db.create_pool(settings)
    redis = cache.create_redis(settings)
    stock = Stock(redis, pool, stock_rules(settings))
    app.state.pool, app.state.redis, app.state.stock = pool, redis, stock
    app.state.orders = Orders(pool=pool, redis=redis, stock=stock, settings=settings)
    app.state.verifier = TokenVerifier(settings)
    app.state.events = Events(pool=pool, settings=settings)
    app.state.relay = Relay(pool=pool, settings=settings) if settings.relay_enabled else None
    if settings.env != "test":
        _tune_gc()
    tasks = [asyncio.create_task(run_forever(app.state.orders))] if settings.workers_enabled else []
    if app.state.relay is not None:
        tasks.append(asyncio.create_task(app.state.relay.run_forever()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app.state.verifier.aclose()
        await redis.aclose()
        await asyncio.wait_for(pool.close(), timeout=5)


def _tune_gc() -> None:
    """Measured under load: a full collection every ~1.2 s took 45-95 ms and freed nothing (the long-lived
    objects are the app itself), which made most of the p99 tail. Freeze what startup built and collect the
    young generation less often: create p99 103 -> 77 ms, soldout p99 72 -> 26 ms, -70 us of CPU per create."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def stock_rules(settings: Settings) -> StockRules:
    window_ms = settings.rate_limit_window_s * 1000
    return StockRules(
        rate=RateLimits(settings.rate_limit_per_user, settings.rate_limit_per_client, window_ms),
        customers=CustomerRules(settings.customer_rate_limit, settings.address_rate_limit, window_ms,
                                settings.max_unpaid_per_customer),
        sold_out_ttl_s=settings.sold_out_ttl_ms / 1000, unknown_ttl_s=settings.unknown_product_ttl_s,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPIOffline(
        title="preorder",
        version=__version__,
        description="Pre-sale orders that never oversell: stock reserved atomically in Redis, "
        "orders durable in PostgreSQL. Errors are RFC 9457 problem+json.",
        lifespan=lifespan,
    )
    app.state.settings = settings or get_settings()
    errors.register(app)
    _map_outages(app)
    app.add_middleware(BodyLimit, max_bytes=app.state.settings.max_body_bytes)
    app.include_router(orders_router)
    app.include_router(products_router)
    app.include_router(events_router)
    app.include_router(audit_router)
    app.include_router(service_router)
    declare_webhooks(app.webhooks)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _map_outages(app: FastAPI) -> None:
    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        response = errors.problem(503, "unavailable", "Service unavailable", f"A dependency is down: {exc!r}")
        response.headers["Retry-After"] = "1"
        return response

    for exc_type in (*db.UNAVAILABLE, *cache.UNAVAILABLE):
        app.add_exception_handler(exc_type, unavailable)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI declares 422 for validation; this service answers 400 problem+json, so say that."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                         webhooks=app.webhooks.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema()
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path in schema.get("paths", {}).values():
        for op in path.values():
            responses = op.get("responses", {})
            validation = responses.get("422", {}).get("content", {}).get("application/json")
            if validation is not None:
                del responses["422"]["content"]["application/json"]
                if not responses["422"]["content"]:
                    del responses["422"]
            if ("400" not in responses and op.get("parameters")) or op.get("requestBody"):
                responses.setdefault("400", problems(400)[400])
    _declare_configured_bounds(schemas, app.state.settings)
    app.openapi_schema = schema
    return schema


def _declare_configured_bounds(schemas: dict[str, Any], settings: Settings) -> None:
    """The quantity cap is configuration (PREORDER_MAX_QUANTITY), so the static model can't carry it."""
    quantity = schemas.get("OrderCreate", {}).get("properties", {}).get("quantity")
    if quantity is not None:
        quantity["maximum"] = settings.max_quantity
