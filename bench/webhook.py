"""`--webhook`: one webhook endpoint registered with the service, and its receiver, so the create path is measured
with the events relay delivering every event (issue 11: create/bare with the relay on and one endpoint, against
the same run with events off, `--env PREORDER_RELAY_ENABLED=false`).

The receiver is a minimal HTTP/1.1 server in a thread of the driver (on the load core, like wrk): it answers
every request 204 at once and counts the deliveries, so the figure is the service's cost, not a slow peer's."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import httpx

from bench.stack import admin_token


class Receiver:
    def __init__(self) -> None:
        self.deliveries = 0
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
        loop = self._loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        with contextlib.suppress(RuntimeError):
            loop.run_forever()
        server.close()
        connections = asyncio.all_tasks(loop)  # the relay's kept-alive connections, each waiting for a request
        for task in connections:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*connections, return_exceptions=True))
        loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.deliveries += 1
                writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        writer.close()


def register(base: str, secret: str, url: str) -> str:
    """The endpoint, for every event type; its id."""
    answer = httpx.post(f"{base}/api/webhooks", json={"url": url, "description": "bench receiver"},
                        headers={"Authorization": f"Bearer {admin_token(secret)}"}, timeout=30)
    if answer.status_code != 201:
        raise RuntimeError(f"registering the webhook: {answer.status_code} {answer.text}")
    return str(answer.json()["id"])
