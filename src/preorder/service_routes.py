"""Service endpoints: liveness, readiness (which dependency is down), Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
async def metrics() -> Response:
    """**Who may call:** anyone who can reach the port (scrape it from inside the network).

    **Changes:** nothing. Counters and histograms in the Prometheus text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
