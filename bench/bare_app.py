"""The `bare` scenario: the framework floor for POST /api/preorder, with no I/O at all.

Same server options as `preorder serve` (uvicorn, uvloop, httptools, no access log, one worker), the same
request model (OrderCreate) and the same token check (TokenVerifier, which caches verified tokens), but the
answer is a constant 201. Whatever the real endpoint costs above this is the service's own work: Redis,
PostgreSQL, the order model, middleware and dependency overhead.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, HTTPException, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from preorder.auth import Principal, TokenVerifier
from preorder.orders.schemas import OrderCreate
from preorder.settings import Settings

# An answer shaped (and sized) like a real order, encoded once: the floor pays nothing to build it.
_ORDER = orjson.dumps({
    "order_id": "01936b2e-7d41-7c2a-9b1e-4f5a6b7c8d9e", "product_id": "BHOT", "user_id": "u00001",
    "quantity": 1, "status": "pending", "amount_due": 4990, "currency": "USD", "payment_reference": None,
    "amount_paid": None, "pay_by": "2026-01-01T00:15:00Z", "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
})
_LOCATION = "/api/preorder/01936b2e-7d41-7c2a-9b1e-4f5a6b7c8d9e"

app = FastAPI(title="preorder-bare", openapi_url=None, docs_url=None, redoc_url=None)
_verifier = TokenVerifier(Settings(env="dev"))  # reads PREORDER_JWT_SECRET like the service
_bearer = HTTPBearer(auto_error=False)


async def principal(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    # async def: a plain `def` dependency would be run in the thread pool, which is not the floor
    if credentials is None:
        raise HTTPException(401, "Missing bearer token")
    return _verifier.verify(credentials.credentials)


@app.post("/api/preorder", status_code=201)
async def create_order(body: OrderCreate, who: Annotated[Principal, Depends(principal)]) -> Response:
    return Response(_ORDER, status_code=201, media_type="application/json", headers={"Location": _LOCATION})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
