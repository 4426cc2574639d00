"""Webhook deliveries per the Standard Webhooks specification, and the address rules (SSRF) for endpoints."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
from standardwebhooks import Webhook

from preorder.errors import BadRequest
from preorder.events.envelope import CONTENT_TYPE

# Enough of an answer to show in the deliveries list; the rest is never read (a receiver can't make us buffer).
MAX_RESPONSE_BYTES = 4096
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class UnsafeUrl(BadRequest):
    kind, title = "unsafe-webhook-url", "Webhook URL not allowed"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse a URL whose host resolves to a loopback, private, link-local or metadata address (any of them)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeUrl("The URL is not valid") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("The URL must be http(s)://host/...")
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port or 443,
                                                             type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):  # no such host, or a name DNS can't carry (a label over 63)
        raise UnsafeUrl(f"The host {parts.hostname} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if _private(address):
            raise UnsafeUrl(f"The host {parts.hostname} resolves to a non-public address ({address})")


def _private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (address in _METADATA or address.is_private or address.is_loopback or address.is_link_local
            or address.is_reserved or address.is_multicast or address.is_unspecified)


@dataclass(frozen=True, slots=True)
class Answer:
    ok: bool
    status: int | None
    latency_ms: int
    error: str | None


class WebhookSender:
    """Redirects are not followed (a 3xx is a failure): a public endpoint must not bounce us to a private one.

    aiohttp, not httpx: py-spy put 48% of the relay process in httpcore's pool, which polls the socket of every
    pooled connection on every request (encode/httpcore#928), 64 polls a delivery with the relay's 64 connections."""

    def __init__(self, *, timeout_s: float, allow_private: bool, max_connections: int) -> None:
        self._allow_private = allow_private
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None  # made in the event loop that sends

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, use_dns_cache=False),
                timeout=self._timeout, auto_decompress=False,
            )
        return self._session

    async def send(self, *, url: str, secret: str, msg_id: str, body: bytes) -> Answer:
        started = time.monotonic()
        try:
            await check_url(url, allow_private=self._allow_private)  # again: DNS may have changed since
            status, text = await self._post(url, _headers(secret, msg_id, body), body)
        except TimeoutError:
            return Answer(False, None, _ms_since(started), f"Timeout: no answer within {self._timeout.total} s")
        except (aiohttp.ClientError, BadRequest, OSError) as exc:
            return Answer(False, None, _ms_since(started), f"{type(exc).__name__}: {exc}"[:500])
        ok = 200 <= status < 300
        return Answer(ok, status, _ms_since(started), None if ok else text[:500] or f"HTTP {status}")

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as response:
            read = b""
            while len(read) < MAX_RESPONSE_BYTES and (chunk := await response.content.read(MAX_RESPONSE_BYTES)):
                read += chunk
            return response.status, read[:MAX_RESPONSE_BYTES].decode(errors="replace")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _headers(secret: str, msg_id: str, body: bytes) -> dict[str, str]:
    now = datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id=msg_id, timestamp=now, data=body.decode())
    return {
        "webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature,
        "content-type": CONTENT_TYPE,
    }


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
