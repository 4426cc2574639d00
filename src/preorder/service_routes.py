"""Service endpoints: liveness, readiness (which dependency is down), Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["service"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is down"}})
async def readyz(request: Request) -> JSONResponse:
    checks = {"postgresql": _check_pg(request), "redis": _check_redis(request)}
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    ready = all(v == "ok" for v in results.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", **results}, status_code=200 if ready else 503)


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


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
