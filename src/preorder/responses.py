"""What each route really answers besides success, for the OpenAPI document: every status with the problem
types it can carry (a `type` enum in the schema, one example each), so /docs reads as a manual and the
schemathesis run holds every answer to its declared types."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from preorder.errors import (
    BadRequest,
    Conflict,
    DomainError,
    Forbidden,
    IdempotencyMismatch,
    MalformedBody,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)

PROBLEM = "application/problem+json"
ProblemKind = int | type[DomainError]


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str


# A bare status code stands for these problem types (name the error classes to be more precise).
_DEFAULT: dict[int, tuple[type[DomainError], ...]] = {
    400: (ValidationFailed, MalformedBody, BadRequest), 401: (Unauthorized,), 403: (Forbidden,), 404: (NotFound,),
    409: (Conflict,), 413: (PayloadTooLarge,), 422: (IdempotencyMismatch,), 429: (RateLimited,),
    503: (Unavailable,),
}
_TEXT = {
    400: "Bad request", 401: "Missing or invalid bearer token", 403: "Not allowed for this role", 404: "Not found",
    409: "Conflict", 413: "Body too large", 422: "Idempotency-Key reused with another body", 429: "Rate limited",
    503: "A dependency is unavailable; retry",
}


def problems(*kinds: ProblemKind) -> dict[int | str, dict[str, Any]]:
    """responses= for a route: each status it can answer besides success, with its problem types."""
    by_status: dict[int, list[type[DomainError]]] = {}
    for kind in kinds:
        for error in _DEFAULT[kind] if isinstance(kind, int) else (kind,):
            listed = by_status.setdefault(error.status, [])
            if error not in listed:
                listed.append(error)
    return {status: problem_response(status, errors) for status, errors in sorted(by_status.items())}


def problem_response(status: int, errors: list[type[DomainError]]) -> dict[str, Any]:
    # No `model`: FastAPI would declare it as application/json too, and errors are only ever problem+json.
    # The Problem schema itself is added to the components by app._openapi.
    types = [f"/problems/{e.kind}" for e in errors]
    schema = {"allOf": [{"$ref": "#/components/schemas/Problem"},
                        {"type": "object", "properties": {"type": {"type": "string", "enum": types}}}]}
    examples = {e.kind: {"summary": e.title, "value": {"type": f"/problems/{e.kind}", "title": e.title,
                                                       "status": status, "detail": e.title}} for e in errors}
    listing = "; ".join(f"`{t}` ({e.title})" for t, e in zip(types, errors, strict=True))
    return {"description": f"{_TEXT.get(status, 'Problem')}: {listing}",
            "content": {PROBLEM: {"schema": schema, "examples": examples}}}
