"""`--webhook`: one webhook endpoint registered with the service, and its receiver, so the create path is measured
with the events relay delivering every event (issue 11: create/bare with the relay on and one endpoint, against
the same run with events off, `--env PREORDER_RELAY_ENABLED=false`).

The receiver is a minimal HTTP/1.1 server in a thread of the driver (on the load core, like wrk): it answers
every request 204 at once and counts the deliveries, so the figure is the service's cost, not a slow peer's. It is
an asyncio protocol on uvloop (11 us of CPU a delivery at 60,000 deliveries a run, 43 us at 12,000: its idle
wake-ups count; 58 us with streams on the default loop), and it reports its CPU time, so a run shows how little
of the load core it took."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import cast

import httpx
import uvloop

from bench.stack import admin_token


class Receiver:
    def __init__(self) -> None:
        self.deliveries = 0
        self.cpu_s = 0.0  # the receiver thread's CPU time, when stopped
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="webhook-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/bench"

    def start(self) -> Receiver:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the webhook receiver did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _serve(self) -> None:
        loop = self._loop = uvloop.new_event_loop()
        server = loop.run_until_complete(loop.create_server(lambda: _Connection(self), "127.0.0.1", 0))
        self.port = cast(asyncio.Server, server).sockets[0].getsockname()[1]  # uvloop's Server has them too
        self._ready.set()
        with contextlib.suppress(RuntimeError):
            loop.run_forever()
        server.close()
        loop.close()
        self.cpu_s = time.thread_time()


class _Connection(asyncio.Protocol):
    """One kept-alive connection of the relay: requests parsed from the bytes as they come. The receiver shares
    the load core with wrk and PostgreSQL, and its CPU is the peer's, not the service's: it must cost little."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass, the same methods

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        answers = 0
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(buffer) < end + 4 + length:
                break  # the rest of the body is still on its way
            buffer = buffer[end + 4 + length:]
            answers += 1
        self._buffer = buffer
        if answers and self._transport is not None:
            self._receiver.deliveries += answers
            self._transport.write(_NO_CONTENT * answers)


_NO_CONTENT = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


def register(base: str, secret: str, url: str) -> str:
    """The endpoint, for every event type; its id."""
    answer = httpx.post(f"{base}/api/webhooks", json={"url": url, "description": "bench receiver"},
                        headers={"Authorization": f"Bearer {admin_token(secret)}"}, timeout=30)
    if answer.status_code != 201:
        raise RuntimeError(f"registering the webhook: {answer.status_code} {answer.text}")
    return str(answer.json()["id"])


def wait_delivered(base: str, receiver: Receiver, *, within_s: float = 600) -> str:
    """How long after now every event is out (the service's relay lag back to 0): the delay that the relay giving
    way to a burst (PREORDER_RELAY_BURST_*) trades for the create path's CPU."""
    started = time.monotonic()
    at_start = receiver.deliveries
    while time.monotonic() - started < within_s:
        lag = _lag(httpx.get(f"{base}/metrics", timeout=10).text)
        if lag == 0:
            return (f"every event delivered {time.monotonic() - started:.1f} s after the last round "
                    f"({receiver.deliveries - at_start:,} of the receiver's {receiver.deliveries:,} after it)")
        time.sleep(0.5)
    return f"events still undelivered {within_s:.0f} s after the last round"


def _lag(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("preorder_events_relay_lag_seconds"):
            return float(line.split()[-1])
    raise RuntimeError("the service's /metrics has no relay lag")
