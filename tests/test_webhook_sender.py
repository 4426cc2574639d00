"""The webhook sender against a real HTTP peer on 127.0.0.1 (a raw asyncio server, so it can answer what a
well-behaved server would not): redirects are not followed, an answer is read up to a bound, a peer that does not
answer is timed out, and a delivery is signed so that the standardwebhooks package verifies it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from standardwebhooks import Webhook

from preorder.events.webhooks import MAX_RESPONSE_BYTES, WebhookSender, new_secret

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class Peer:
    """Reads one request per connection (head and body), records its path, headers and body, and answers with
    the function given for that path."""

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            path = lines[0].split()[1]
            headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((path, headers, body))
            await self.answers[path](body, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    async def no_content(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    async def redirect(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 302 Found\r\nlocation: {p.url('/inside')}\r\ncontent-length: 0\r\n\r\n".encode())
        await writer.drain()

    async def endless(_: bytes, writer: asyncio.StreamWriter) -> None:  # a 500 whose body never ends
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.001)

    async def silent(_: bytes, __: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    p = Peer({"/ok": no_content, "/inside": no_content, "/moved": redirect, "/endless": endless, "/silent": silent})
    server = await asyncio.start_server(p.handle, "127.0.0.1", 0)
    p.port = server.sockets[0].getsockname()[1]
    try:
        yield p
    finally:
        server.close()


@pytest.fixture
async def sender() -> AsyncIterator[WebhookSender]:
    s = WebhookSender(timeout_s=1.0, allow_private=True, max_connections=4)
    try:
        yield s
    finally:
        await s.close()


async def test_a_delivery_is_signed_and_verifies(peer: Peer, sender: WebhookSender) -> None:
    secret = new_secret()
    answer = await sender.send(url=peer.url("/ok"), secret=secret, msg_id="msg_1", body=b'{"a": 1}')
    assert (answer.ok, answer.status, answer.error) == (True, 204, None)
    [(_, headers, body)] = peer.requests
    assert Webhook(secret).verify(body, headers) == {"a": 1}
    assert headers["webhook-id"] == "msg_1"


async def test_a_redirect_is_a_failure_and_is_not_followed(peer: Peer, sender: WebhookSender) -> None:
    answer = await sender.send(url=peer.url("/moved"), secret=new_secret(), msg_id="msg_2", body=b"{}")
    assert (answer.ok, answer.status) == (False, 302)
    assert [path for path, _, _ in peer.requests] == ["/moved"]


async def test_an_answer_is_read_only_up_to_the_bound(peer: Peer, sender: WebhookSender) -> None:
    started = time.monotonic()
    answer = await sender.send(url=peer.url("/endless"), secret=new_secret(), msg_id="msg_3", body=b"{}")
    assert (answer.ok, answer.status) == (False, 500)
    assert answer.error == "x" * 500  # the first bytes of the body, cut for the deliveries list
    assert time.monotonic() - started < 1.0, "read on past the bound, until the timeout"
    assert MAX_RESPONSE_BYTES == 4096


async def test_a_peer_that_does_not_answer_is_timed_out(peer: Peer, sender: WebhookSender) -> None:
    answer = await sender.send(url=peer.url("/silent"), secret=new_secret(), msg_id="msg_4", body=b"{}")
    assert not answer.ok and answer.status is None
    assert answer.error is not None and "Timeout" in answer.error
    assert 900 <= answer.latency_ms < 5000


async def test_a_private_address_is_refused_when_not_allowed(peer: Peer) -> None:
    strict = WebhookSender(timeout_s=1.0, allow_private=False, max_connections=4)
    try:
        answer = await strict.send(url=peer.url("/ok"), secret=new_secret(), msg_id="msg_5", body=b"{}")
    finally:
        await strict.close()
    assert not answer.ok and answer.error is not None and "non-public" in answer.error
    assert peer.requests == []
