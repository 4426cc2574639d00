"""The `bare` and `bare+auth` scenarios: the framework's ceiling for POST /api/preorder, with no I/O at all.

Both are served with the options `preorder serve` passes to uvicorn (uvloop, httptools, no access log, one
worker), parse the same request model (OrderCreate) and answer a constant 201 shaped like a real order.

- `app` (`bare`): nothing else, no dependency at all. This is the ceiling the ratios are quoted against:
  whatever the real endpoint costs above it is the service's own work (auth, Redis, PostgreSQL, the order
  model, middleware, dependency overhead).
- `app_auth` (`bare+auth`): the same plus the token check the service runs (HTTPBearer + TokenVerifier, which
  caches verified tokens). Earlier rounds quoted their ratios against this one.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, HTTPException, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.telemetry import TelemetryConfig

from preorder.auth import Principal, TokenVerifier
from preorder.orders.schemas import OrderCreate
from preorder.settings import Settings

# An answer shaped (and sized) like a real order, encoded once: the ceiling pays nothing to build it.
_ORDER = orjson.dumps({
    "order_id": "01936b2e-7d41-7c2a-9b1e-4f5a6b7c8d9e", "product_id": "BHOT", "user_id": "u00001",
    "quantity": 1, "status": "pending", "amount_due": 4990, "currency": "USD", "payment_reference": None,
    "amount_paid": None, "pay_by": "2026-01-01T00:15:00Z", "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
})
_LOCATION = "/api/preorder/01936b2e-7d41-7c2a-9b1e-4f5a6b7c8d9e"
# The service's option (preorder.app.NO_FRAMEWORK_TELEMETRY), spelled out here so that `--ref` can benchmark a
# commit from before it against this ceiling.
_NO_FRAMEWORK_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def _answer() -> Response:
    return Response(_ORDER, status_code=201, media_type="application/json", headers={"Location": _LOCATION})


def _new_app(title: str) -> FastAPI:
    made = FastAPI(title=title, openapi_url=None, docs_url=None, redoc_url=None, telemetry=_NO_FRAMEWORK_TELEMETRY)

    @made.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return made


# ---- bare: the body model and a constant answer, nothing else ----------------------------------------------

app = _new_app("preorder-bare")


@app.post("/api/preorder", status_code=201)
async def create_order(body: OrderCreate) -> Response:
    return _answer()


# ---- bare+auth: the same with the service's token check -----------------------------------------------------

app_auth = _new_app("preorder-bare-auth")
_verifier = TokenVerifier(Settings(env="dev"))  # reads PREORDER_JWT_SECRET like the service
_bearer = HTTPBearer(auto_error=False)


async def principal(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    # async def: a plain `def` dependency would be run in the thread pool, which is not the ceiling
    if credentials is None:
        raise HTTPException(401, "Missing bearer token")
    return _verifier.verify(credentials.credentials)


@app_auth.post("/api/preorder", status_code=201)
async def create_order_auth(body: OrderCreate, who: Annotated[Principal, Depends(principal)]) -> Response:
    return _answer()
