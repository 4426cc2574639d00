"""Real peers for the events tests: a webhook receiver (uvicorn on 127.0.0.1) that verifies every signature
with the standardwebhooks package, and a reader of the NATS JetStream stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import nats
import orjson
import uvicorn
from nats.js.errors import NotFoundError
from standardwebhooks import Webhook

from preorder.embedded import free_port
from tests.conftest import ADMIN

Mode = Literal["ok", "fail", "hang"]


@dataclass
class Received:
    event: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Receiver:
    """Answers 204 (mode ok), 500 (fail) or nothing for `hang_s` seconds (hang). Endpoints are paths: /<name>,
    each with its secret; a request whose signature does not verify is answered 400 and kept in `forged`."""

    hang_s: float = 10.0
    mode: Mode = "ok"
    secrets: dict[str, str] = field(default_factory=dict)
    received: dict[str, list[Received]] = field(default_factory=dict)
    forged: list[str] = field(default_factory=list)
    attempts: int = 0
    port: int = field(default_factory=free_port)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r.event for r in self.received.get(name, [])]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the sender died mid-request (kill -9): nothing arrived
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        status = await self._answer(scope["path"].strip("/"), body, headers)
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def _answer(self, name: str, body: bytes, headers: dict[str, str]) -> int:
        self.attempts += 1
        mode = self.mode  # as the request arrived: a request the sender gave up on is never counted as received
        if mode == "hang":
            await asyncio.sleep(self.hang_s)
        if mode != "ok":
            return 500
        try:
            event = Webhook(self.secrets[name]).verify(body, headers)
        except Exception as exc:
            self.forged.append(f"{name}: {exc!r}")
            return 400
        self.received.setdefault(name, []).append(Received(event, headers))
        return 204

    async def start(self) -> None:
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            assert not self._task.done(), "the receiver did not start"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task


@contextlib.asynccontextmanager
async def receiving(**kw: Any) -> AsyncIterator[Receiver]:
    receiver = Receiver(**kw)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def stream_events(nats_url: str) -> list[dict[str, Any]]:
    """Every message in the PREORDER stream, in stream order, with its Nats-Msg-Id checked against the event id."""
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info("PREORDER")
        except NotFoundError:
            return []
        seqs = range(info.state.first_seq, info.state.last_seq + 1)
        messages = []
        for start in range(0, len(seqs), 200):  # a few hundred requests in flight, not thousands
            messages += await asyncio.gather(*(js.get_msg("PREORDER", seq) for seq in seqs[start:start + 200]))
        events = []
        for msg in messages:
            event = orjson.loads(msg.data or b"")
            assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == event["id"]
            assert msg.subject == event["type"]
            events.append(event)
        return events
    finally:
        await nc.close()


async def purge_stream(nats_url: str) -> None:
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream("PREORDER")
    finally:
        await nc.close()


async def endpoint(client: httpx.AsyncClient, receiver: Receiver, name: str, **body: Any) -> dict[str, Any]:
    """A webhook endpoint registered for the receiver's path `name`, its secret given to the receiver."""
    r = await client.post("/api/webhooks", json={"url": receiver.url(name), **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    created = dict(r.json())
    receiver.secrets[name] = created["secret"]
    return created
