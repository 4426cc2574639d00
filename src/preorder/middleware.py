"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task per request on the hot path)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from preorder import errors


class BodyTooLarge(HTTPException):
    """Raised while a streamed body is read. An HTTPException because FastAPI re-raises those from its body
    parsing (anything else it turns into a 400), so the app's handler renders it as a 413 problem."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request bodies are limited to {limit} bytes")


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, whether announced by Content-Length or streamed.

    Not Starlette's RequestBodyLimitMiddleware: when the app answers without reading the body (a 401 comes
    before the body is parsed) it sends a text/plain 413, and every error of this service is problem+json.
    An announced oversize body is refused here, before any auth or parsing work is done for it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _announced_length(scope) > self.max_bytes:
            response = errors.problem(413, "payload-too-large", "Request body too large",
                                      f"Request bodies are limited to {self.max_bytes} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def _announced_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return 0
