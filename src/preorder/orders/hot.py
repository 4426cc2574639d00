"""POST /api/preorder served beside the framework, not through it.

Profiled under a flash sale, FastAPI's route machinery (the router, the exception and exit-stack middleware, the
request object, dependency solving, the response object) cost more CPU per create than the order itself. This
middleware answers the ordinary create (a bearer token, a JSON body that is a valid OrderCreate, a sane
Idempotency-Key if any) with the same service call and the same answers as the route, and hands every other
request to the app untouched, with the body it read replayed. So a malformed body, a missing token, an oversized
or streamed-oversize body and every other path keep the framework's exact answers, and the route stays
registered, documented in /docs and the OpenAPI document, and used for those requests.

It sits inside Observe (request id, metrics by route template, the access line) and outside BodyLimit, so it
checks the announced size itself and falls through when the body turns out larger."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from preorder import errors
from preorder.orders.router import place_order, router, valid_idempotency_key
from preorder.orders.schemas import OrderCreate

PATH = "/api/preorder"
_validate = OrderCreate.model_validate_json


class HotCreate:
    def __init__(self, app: ASGIApp, *, service: FastAPI, max_bytes: int) -> None:
        self.app, self.service, self.max_bytes = app, service, max_bytes
        self.route = next(r for r in router.routes
                          if isinstance(r, APIRoute) and r.path == PATH and "POST" in (r.methods or ()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        token = key = None
        json_body = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value
            elif name == b"content-type":
                json_body = value == b"application/json"
            elif name == b"idempotency-key":
                key = value
            elif name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                return await self.app(scope, receive, send)  # BodyLimit answers 413
        if token is None or not json_body:
            return await self.app(scope, receive, send)
        read, raw = await self._read(receive)
        replay = _replaying(read, receive)
        answer = None if raw is None else await self._answer(scope, raw, token, key)
        if answer is None:
            return await self.app(scope, replay, send)
        await answer(scope, replay, send)

    async def _read(self, receive: Receive) -> tuple[list[Message], bytes | None]:
        """The whole body, or None (with what was read) when it is larger than allowed or the client left."""
        read: list[Message] = []
        size = 0
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                return read, None
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return read, None
            if not message.get("more_body", False):
                break
        return read, read[0].get("body", b"") if len(read) == 1 else b"".join(m.get("body", b"") for m in read)

    async def _answer(self, scope: Scope, raw: bytes, token: bytes,
                      key: bytes | None) -> Callable[[Scope, Receive, Send], Awaitable[None]] | None:
        """The create's answer, or None for a request only the route answers exactly (its errors)."""
        scheme, _, credentials = token.decode("latin-1").partition(" ")
        credentials = credentials.strip()
        idem_key = None if key is None else key.decode("latin-1")
        if scheme.lower() != "bearer" or not credentials or (idem_key is not None
                                                              and not valid_idempotency_key(idem_key)):
            return None
        try:
            body = _validate(raw)
        except (ValidationError, ValueError, orjson.JSONDecodeError):
            return None
        state = self.service.state
        try:
            principal = await state.verifier.authenticate(credentials)
        except Exception:  # refused or unverifiable: the route answers it (401, 503) exactly as ever
            return None
        scope["route"] = self.route  # Observe labels the metrics and the access line by the route template
        client = scope["client"][0] if scope.get("client") else "unknown"
        try:
            return await place_order(state.orders, principal, body, idem_key=idem_key, client=client)
        except errors.OUTAGES as exc:
            return errors.unavailable(scope["method"], scope["path"], exc)


def _replaying(read: list[Message], receive: Receive) -> Receive:
    """A receive that gives back the messages already read, then the client's."""
    pending = iter(read)

    async def replay() -> Message:
        message = next(pending, None)
        return message if message is not None else await receive()

    return replay
