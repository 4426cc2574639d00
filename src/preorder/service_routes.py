"""Service endpoints: liveness, readiness (which dependency is down), Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from preorder import errors, metrics
from preorder.products import repository as products
from preorder.stock.keys import product_keys

log = logging.getLogger("preorder.metrics")
# Stock gauges cover the products on sale now, at most this many: a label set that stays bounded.
MAX_STOCK_PRODUCTS = 200

router = APIRouter(tags=["service"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """**Who may call:** anyone (orchestrators' liveness probes).

    **Changes:** nothing. 200 while the process serves requests, whatever its dependencies."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", responses={503: {"description": "A dependency is down"}})
async def readyz(request: Request) -> JSONResponse:
    """**Who may call:** anyone (load balancers' readiness probes).

    **Changes:** nothing. 200 when PostgreSQL and Redis answer, else 503 naming the one that is down."""
    checks = {"postgresql": _check_pg(request), "redis": _check_redis(request)}
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    ready = all(v == "ok" for v in results.values())
    events = _check_events(request)
    state = ("ready" if events == "ok" else "degraded") if ready else "unavailable"
    return JSONResponse({"status": state, **results, "events": events}, status_code=200 if ready else 503)


def _check_events(request: Request) -> str:
    """A relay far behind still serves orders (200), but says so: events are late, none is lost."""
    relay = request.app.state.relay
    if relay is None:
        return "off"
    bound = request.app.state.settings.events_lag_degraded_s
    return "ok" if relay.lag_s <= bound else f"degraded: oldest unsent event is {relay.lag_s:.0f} s old"


async def _check_pg(request: Request) -> str:
    try:
        await asyncio.wait_for(request.app.state.pool.fetchval("SELECT 1"), timeout=2)
        return "ok"
    except Exception as exc:
        return f"down: {type(exc).__name__}"


async def _check_redis(request: Request) -> str:
    try:
        await asyncio.wait_for(request.app.state.redis.ping(), timeout=2)
        return "ok"
    except Exception as exc:
        return f"down: {type(exc).__name__}"


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def scrape(request: Request) -> Response:
    """**Who may call:** anyone who can reach the port (scrape it from inside the network).

    **Changes:** nothing. Counters, gauges and histograms in the Prometheus text format, summed over the
    workers of `preorder serve --workers N`."""
    stock = CollectorRegistry(auto_describe=False)
    stock.register(metrics.StockLevels(await _live_stock(request)))
    return Response(generate_latest(metrics.registry()) + generate_latest(stock), media_type=CONTENT_TYPE_LATEST)


async def _live_stock(request: Request) -> list[tuple[str, int, int]]:
    """(product, total, reserved) from Redis for the products in a live presale; none while a dependency is down,
    so a scrape always answers (the outage shows in the request metrics and /readyz)."""
    try:
        async with asyncio.timeout(2):
            ids = await products.live_ids(request.app.state.pool, limit=MAX_STOCK_PRODUCTS)
            pipe = request.app.state.redis.pipeline(transaction=False)
            for pid in ids:
                pipe.hmget(product_keys(pid).stock, ["total", "reserved"])
            found = await pipe.execute()
    except errors.OUTAGES as exc:
        log.warning("stock gauges skipped: %r", exc)
        return []
    return [(pid, int(t), int(r)) for pid, (t, r) in zip(ids, found, strict=True) if t is not None and r is not None]
