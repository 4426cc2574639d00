"""The NATS JetStream sink: stream PREORDER on subjects preorder.order.>, the event id as Nats-Msg-Id so that a
resend inside the stream's duplicate window is dropped by the server."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from preorder.events.envelope import CONTENT_TYPE, TYPE_PREFIX

log = logging.getLogger("preorder.events")
STREAM = "PREORDER"
SUBJECTS = [TYPE_PREFIX + ">"]


class NatsSink:
    """One connection per process, made on first use. It does not reconnect by itself: a connection that
    closed (the server went away) is replaced on the next round, so a publish never waits on a reconnect loop."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self._url, self._timeout_s = url, timeout_s
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    async def publish_all(self, events: list[tuple[dict[str, Any], bytes]]) -> list[BaseException | None]:
        """Each event's failure, or None once the stream acknowledged it. No connection: every event fails."""
        try:
            js = await self._stream()
        except Exception as exc:
            await self.close()
            return [exc] * len(events)
        results = await asyncio.gather(*(self._publish(js, e, body) for e, body in events), return_exceptions=True)
        if any(r is not None for r in results):
            await self.close()  # the next round starts from a fresh connection
        return [r if isinstance(r, BaseException) else None for r in results]

    async def _publish(self, js: JetStreamContext, event: dict[str, Any], body: bytes) -> None:
        headers = {"Nats-Msg-Id": event["id"], "Content-Type": CONTENT_TYPE}
        await js.publish(event["type"], body, timeout=self._timeout_s, headers=headers)

    async def _stream(self) -> JetStreamContext:
        if self._nc is not None and self._js is not None and self._nc.is_connected:
            return self._js
        await self.close()
        self._nc = await nats.connect(self._url, allow_reconnect=False, connect_timeout=self._timeout_s,
                                      error_cb=_quiet, name="preorder-relay")
        self._js = self._nc.jetstream(timeout=self._timeout_s)
        await ensure_stream(self._js)
        return self._js

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), timeout=self._timeout_s)
            except Exception as exc:  # closing a dead connection: nothing left to save
                log.debug("closing the NATS connection failed: %r", exc)


async def ensure_stream(js: JetStreamContext) -> None:
    """Create the stream if it is missing; an existing one is left as its operator configured it."""
    try:
        await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(name=STREAM, subjects=SUBJECTS)


async def _quiet(exc: Exception) -> None:
    log.debug("NATS: %r", exc)
