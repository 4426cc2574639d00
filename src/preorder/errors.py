"""Domain errors: each knows its HTTP status and problem type; one handler renders them (RFC 9457)."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from preorder import cache, db, logs

log = logging.getLogger("preorder")
PROBLEM = "application/problem+json"
# A dependency not answering (refused, reset, timed out): the request gets 503 + Retry-After, never 500.
OUTAGES: tuple[type[Exception], ...] = (*db.UNAVAILABLE, *cache.UNAVAILABLE)


class DomainError(Exception):
    status = 400
    kind = "bad-request"
    title = "Bad request"
    headers: dict[str, str] | None = None
    reason = "bad_request"  # the metrics label of a refused create (a bounded set: one per class)

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


class BadRequest(DomainError):
    pass


class ValidationFailed(BadRequest):
    """A field failed its schema (rendered by _validation_error with the list of errors)."""

    kind, title = "validation-error", "Invalid request"


class MalformedBody(BadRequest):
    """A body that is not JSON at all (Starlette's parse error, rendered by _http_error)."""

    kind, title = "malformed-body", "Malformed request body"


class PayloadTooLarge(DomainError):
    """A body over PREORDER_MAX_BODY_BYTES (rendered by the BodyLimit middleware and _http_error)."""

    status, kind, title = 413, "payload-too-large", "Request body too large"


class NotFound(DomainError):
    status, kind, title, reason = 404, "not-found", "Not found", "not_found"


class Conflict(DomainError):
    status, kind, title, reason = 409, "conflict", "Conflict", "conflict"


class OutOfStock(Conflict):
    kind, title, reason = "out-of-stock", "Out of stock", "out_of_stock"


class SoldOutMark(OutOfStock):
    """Refused from this process's memory of a sold-out answer, without asking Redis (same problem type)."""

    reason = "sold_out_mark"


class UserLimitReached(Conflict):
    kind, title, reason = "per-user-limit", "Per-user limit reached", "user_limit"


class UnpaidLimitReached(Conflict):
    kind, title, reason = "unpaid-limit", "Too many units held unpaid", "unpaid_limit"


class PresaleClosed(Conflict):
    kind, title, reason = "presale-closed", "Presale is not open", "presale_closed"


class PresaleNotStarted(PresaleClosed):
    reason = "not_started"


class PresaleEnded(PresaleClosed):
    reason = "ended"


class ConstraintViolated(Conflict):
    """A write the database refused by a CHECK constraint (rendered by _constraint)."""

    kind, title = "constraint", "Conflict with the stored record"


class InvalidTransition(Conflict):
    kind, title = "invalid-transition", "Transition not allowed"


class PaymentMismatch(Conflict):
    kind, title = "payment-mismatch", "Payment does not match the amount due"


class BalanceWindowNotOpen(Conflict):
    kind, title = "balance-window-not-open", "The balance window is not open yet"


class PaymentReferenceUsed(Conflict):
    kind, title = "payment-reference-used", "Payment reference already used"


class IdempotencyInProgress(Conflict):
    kind, title = "idempotency-in-progress", "A request with this Idempotency-Key is still running"
    reason = "idempotency"


class IdempotencyMismatch(DomainError):
    status, kind, title = 422, "idempotency-key-reused", "Idempotency-Key was used with another request"
    reason = "idempotency"


class Unauthorized(DomainError):
    status, kind, title, reason = 401, "unauthorized", "Unauthorized", "unauthorized"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.headers = {"WWW-Authenticate": "Bearer"}  # RFC 6750: say which scheme would be accepted


class Forbidden(DomainError):
    status, kind, title, reason = 403, "forbidden", "Forbidden", "forbidden"


class RateLimited(DomainError):
    status, kind, title, reason = 429, "rate-limited", "Too many requests", "rate_limited"

    def __init__(self, retry_after: int, detail: str = "Too many order requests; retry later") -> None:
        super().__init__(detail, retry_after=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


class Unavailable(DomainError):
    status, kind, title, reason = 503, "unavailable", "Service unavailable", "unavailable"

    def __init__(self, detail: str = "", retry_after: int = 1) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


class ProblemResponse(JSONResponse):
    """problem+json rendered by orjson: most of a flash sale's answers are 409s (stdlib json measured ~12 us)."""

    media_type = PROBLEM

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)


def problem(status: int, kind: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": f"/problems/{kind}", "title": title, "status": status, "detail": detail, **extra}
    info = logs.CURRENT.get()
    if info is not None:  # the occurrence: the request id, which the access line and the error's log lines carry
        body["instance"] = f"urn:request:{info.request_id}"
        info.problem = kind
    return ProblemResponse(body, status_code=status)


def render(exc: DomainError) -> JSONResponse:
    response = problem(exc.status, exc.kind, exc.title, exc.detail, **exc.extra)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return render(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors)
    return problem(400, ValidationFailed.kind, ValidationFailed.title, f"Invalid fields: {fields}", errors=errors)


# Errors raised by Starlette itself (unknown path or method, an oversized streamed body) get a type of their own.
_HTTP_KINDS = {
    400: (MalformedBody.kind, MalformedBody.title),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Request body too large"),
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind, title = _HTTP_KINDS.get(exc.status_code, ("http-error", str(exc.detail)))
    response = problem(exc.status_code, kind, title, str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the methods of the first route that matched the path; RFC 9110 wants them all.
        response.headers["Allow"] = ", ".join(_allowed_methods(request))
    return response


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):  # included routers flattened, prefixes applied
        if route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def _constraint(_: Request, exc: Exception) -> JSONResponse:
    """A write the database refused by a CHECK constraint (e.g. a PATCH moving starts_at past the stored
    ends_at): the request conflicts with the stored record. Services check first; this is the safety net."""
    assert isinstance(exc, asyncpg.CheckViolationError)
    detail = f"The change breaks a rule of the stored record ({exc.constraint_name or 'check'})"
    return problem(409, ConstraintViolated.kind, ConstraintViolated.title, detail)


def unavailable(method: str, path: str, exc: BaseException) -> JSONResponse:
    """A dependency (PostgreSQL, Redis) did not answer: 503 with Retry-After. The exception (with hosts and ports)
    goes to the log, its repr, not its traceback: an outage makes many of these at once, and formatting
    tracebacks then costs the CPU the requests still being served need (measured: the PostgreSQL-outage fault
    test's slowest answer grew). The client gets no internals."""
    log.warning("dependency unavailable on %s %s: %r", method, path, exc)
    response = problem(503, "unavailable", "Service unavailable", "A dependency is not answering; retry shortly")
    response.headers["Retry-After"] = "1"
    return response


def unexpected(method: str, path: str, exc: BaseException) -> JSONResponse:
    """Any error no handler knows: logged with its exception (and the request id), answered as a plain 500."""
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return problem(500, "internal", "Internal error", "The server failed; it has been logged.")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected(request.method, request.url.path, exc)


def register(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(asyncpg.CheckViolationError, _constraint)
    app.add_exception_handler(Exception, _unexpected)
