"""What each route really answers besides success, for the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    # No `model`: FastAPI would declare it as application/json too, and errors are only ever problem+json.
    # The Problem schema itself is added to the components by app._openapi.
    media = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {code: {"content": media, "description": _TEXT.get(code, "Problem")} for code in codes}


_TEXT = {
    400: "Bad request",
    401: "Missing or invalid bearer token",
    403: "Not allowed for this role",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    422: "Idempotency-Key reused with another body",
    429: "Rate limited",
    503: "A dependency is unavailable; retry",
}
