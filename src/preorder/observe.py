"""One pure ASGI middleware per request: the request id (X-Request-ID or a new one, echoed back), the RED metrics by
route template, and one access log line. Pure ASGI, not BaseHTTPMiddleware (a task per request), and the label
children are cached, so the create path pays a few microseconds for it."""

from __future__ import annotations

import re
import time

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uuid_utils import uuid7

from preorder import errors, logs, metrics

_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
UNMATCHED = "unmatched"  # the route label of paths no route matched: a bounded label, never the raw path
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def request_id(scope: Scope) -> str:
    """The caller's X-Request-ID when it is a sane token (so ids join up across services), else a new UUIDv7."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _CLIENT_ID.fullmatch(value):
                return str(value.decode())
            break
    return str(uuid7())


class Observe:
    def __init__(self, app: ASGIApp, *, access_log: bool, log_format: logs.LogFormat = "json") -> None:
        self.app, self.access_log = app, access_log
        self._children: dict[tuple[str, str, int], Histogram] = {}
        self._templates: dict[object, str] = {}  # endpoint -> template, of the plain routes (_plain_route)
        self._in_flight = metrics.IN_FLIGHT
        self._log = logs.access_logger(log_format)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        info = logs.RequestInfo(request_id(scope))
        token = logs.CURRENT.set(info)
        status = 0  # no answer started yet
        header = (b"x-request-id", info.request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        self._in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # answered here, inside the request's context: the 500 carries the request id
            if status:
                raise  # the answer is half sent: only the server can end it (it drops the connection)
            await errors.unexpected(scope["method"], scope["path"], exc)(scope, receive, send_with_id)
        finally:
            self._in_flight.dec()
            self._record(scope, status or 500, time.perf_counter() - started, info)
            logs.CURRENT.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float, info: logs.RequestInfo) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or self._plain_route(scope)
        method = scope["method"] if scope["method"] in _METHODS else "other"
        self._child(method, template, status // 100).observe(seconds)
        if self.access_log:
            self._log.info("request", method=method, route=template, status=status, request_id=info.request_id,
                           duration_ms=int(seconds * 1_000_000) / 1000, problem=info.problem)

    def _plain_route(self, scope: Scope) -> str:
        """FastAPI names the route in the scope only for its API routes: a plain Starlette route it matched (the
        OpenAPI schema's) leaves its endpoint there instead, and this finds that route's template."""
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return UNMATCHED
        template = self._templates.get(endpoint)
        if template is None:
            found = (r for r in getattr(scope.get("app"), "routes", ()) if getattr(r, "endpoint", None) is endpoint)
            template = self._templates[endpoint] = getattr(next(found, None), "path", UNMATCHED)
        return template

    def _child(self, method: str, route: str, status_class: int) -> Histogram:
        key = (method, route, status_class)
        child = self._children.get(key)
        if child is None:
            label = metrics.STATUS_CLASSES.get(status_class, "other")
            child = self._children[key] = metrics.REQUEST_SECONDS.labels(method, route, label)
        return child
