"""Fault-test harness: a real `preorder serve` subprocess, a TCP proxy that can cut PostgreSQL away from it,
traffic generators that record every answer, and `eventually` to await a condition with a deadline."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx

from preorder.embedded import free_port
from tests.conftest import ADMIN, SECRET, bearer
from tests.invariants import record_created

T = TypeVar("T")
KEEPALIVE_EXPIRY_S = 2.0  # under uvicorn's keep-alive timeout (5 s)
PREORDER = Path(sys.executable).with_name("preorder")

# Short enough that orphan holds age out within a test, long enough that a busy 2-core machine rarely
# times a statement out. settings.py requires orphan_hold_s > write_deadline_s > statement timeout.
FAST_TIMINGS = {
    "PREORDER_DB_STATEMENT_TIMEOUT_MS": "1000",
    "PREORDER_DB_CONNECT_TIMEOUT_S": "1",
    "PREORDER_REDIS_TIMEOUT_S": "1",
    "PREORDER_WRITE_DEADLINE_S": "1.5",
    "PREORDER_ORPHAN_HOLD_S": "2.5",
    "PREORDER_SWEEP_INTERVAL_S": "0.3",
    "PREORDER_RECONCILE_INTERVAL_S": "0.3",
    # Only the pass at start is a full one: the holds a test leaves behind must be found by the regular pass.
    "PREORDER_RECONCILE_FULL_INTERVAL_S": "3600",
}


async def eventually(check: Callable[[], Awaitable[T]], *, within: float, interval: float = 0.05) -> T:
    """Await check() until it stops raising AssertionError; after `within` seconds, its last failure is raised."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(interval)


def server_env(database_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREORDER_")}
    env.update({
        "PREORDER_ENV": "test", "PREORDER_DATABASE_URL": database_url, "PREORDER_REDIS_URL": redis_url,
        "PREORDER_JWT_SECRET": SECRET,
        # Another change adds rate limiting; these tests measure faults, not limits.
        "PREORDER_RATE_LIMIT_PER_USER": "1000000000", "PREORDER_RATE_LIMIT_PER_CLIENT": "1000000000",
        "PREORDER_CUSTOMER_RATE_LIMIT": "1000000000", "PREORDER_ADDRESS_RATE_LIMIT": "1000000000",
        "PREORDER_MAX_UNPAID_PER_CUSTOMER": "1000000000",
        **FAST_TIMINGS,
    })
    env.update(overrides)
    return env


@dataclass
class Server:
    """One `preorder serve` on 127.0.0.1, with `workers` uvicorn worker processes. It runs in a session of its
    own, and only that process group (this server and its workers, nothing else) is ever signalled."""

    env: dict[str, str]
    log_dir: Path
    workers: int = 1
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    args: tuple[str, ...] = ()  # more `preorder serve` options, e.g. ("--workers", "2")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, within: float = 60) -> None:  # a worker boots in seconds, more on a loaded machine
        self._spawn()
        await eventually(self._healthy, within=within, interval=0.1)

    def _spawn(self) -> None:
        self.starts += 1
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(PREORDER), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", str(self.workers), *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    async def _healthy(self) -> None:
        assert self.process is not None
        assert self.process.poll() is None, f"preorder serve exited with {self.process.returncode}:\n{self.log_tail()}"
        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=1) as c:
                r = await c.get("/healthz")
        except httpx.TransportError as exc:
            raise AssertionError(f"not listening yet: {exc!r}") from None
        assert r.status_code == 200
        # Each worker starts on its own; one answering /healthz says nothing of the others.
        started = self.log.read_text(errors="replace").count("Application startup complete")
        assert started >= self.workers, f"{started} of {self.workers} workers started"

    def kill(self) -> None:
        """kill -9 of the server and its workers: no shutdown, no cleanup, in-flight requests die with them.
        (Killing only the supervisor would leave its workers serving.)"""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)  # uvicorn's supervisor stops its workers gracefully
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    @property
    def log(self) -> Path:
        """The log of the latest start."""
        return self.log_dir / f"serve-{self.port}-{self.starts}.log"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def client(self, **kw: Any) -> httpx.AsyncClient:
        # An idle connection is dropped by the client before the server's keep-alive timeout (uvicorn's 5 s) can
        # close it: otherwise a request sent on it as the server closes it dies unanswered (status 0).
        limits = httpx.Limits(max_connections=kw.pop("max_connections", 100), max_keepalive_connections=100,
                              keepalive_expiry=KEEPALIVE_EXPIRY_S)
        return httpx.AsyncClient(base_url=self.url, timeout=kw.pop("timeout", 30), limits=limits,
                                 event_hooks={"response": [record_created]}, **kw)


# ---- a TCP proxy between the app and PostgreSQL -------------------------------------------------------

class PgProxy:
    """Listens on 127.0.0.1 and forwards to PostgreSQL (its unix socket, or host:port). cut() makes
    PostgreSQL unreachable for the app: 'reset' drops every connection and refuses new ones at once;
    'blackhole' keeps sockets open but lets no byte through, like a network partition."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.port = 0
        self.mode = "open"
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The app's PREORDER_DATABASE_URL: same user and database, through the proxy."""
        parts = urlsplit(self.database_url)
        query = {k: v for k, v in parse_qs(parts.query).items() if k not in ("host", "port")}
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit((parts.scheme, f"{userinfo}127.0.0.1:{self.port}", parts.path, urlencode(query, True), ""))

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self.database_url)
        host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
        port = parts.port or int(parse_qs(parts.query).get("port", ["5432"])[0])
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self, mode: str) -> None:
        assert mode in ("reset", "blackhole")
        self.mode = mode
        if mode == "reset":
            self._drop_all()

    def restore(self) -> None:
        # Streams that were blackholed may have lost half a message: they can never be used again.
        self._drop_all()
        self.mode = "open"

    def _drop_all(self) -> None:
        for w in list(self._open):
            w.transport.abort()
        self._open.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            writer.transport.abort()
            return
        self._open.add(writer)
        try:
            up_reader, up_writer = await self._connect_upstream()
        except OSError:
            writer.transport.abort()
            return
        self._open.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, peer=writer if dst is up_writer else up_writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, peer: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self.mode != "open":
                    continue  # a partition swallows the bytes
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (dst, peer):
                w.transport.abort()
                self._open.discard(w)


class RedisProxy(PgProxy):
    """The same proxy in front of a Redis server, whose target can be switched: what Sentinel's failover or a
    floating address does for the app, which keeps its one PREORDER_REDIS_URL."""

    def __init__(self, target_port: int) -> None:
        super().__init__("")
        self.target_port = target_port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def retarget(self, port: int) -> None:
        self.target_port = port
        self.restore()  # every open connection goes to the old server: drop them

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.target_port)


# ---- traffic --------------------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int  # 0: no HTTP answer at all (the connection died with the process)
    seconds: float
    body: dict[str, Any] | None
    headers: httpx.Headers | None
    started: float  # time.monotonic() when sent


@dataclass
class Traffic:
    """Every answer to every create, in order of arrival, and the orders answered 201 (id -> quantity)."""

    answers: list[Answer] = field(default_factory=list)
    created: dict[str, int] = field(default_factory=dict)
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.answers)

    async def record(self, answer: Answer) -> None:
        self.answers.append(answer)
        if answer.status == 201 and answer.body is not None:
            self.created[answer.body["order_id"]] = answer.body["quantity"]
        async with self._progress:
            self._progress.notify_all()

    async def reached(self, count: int) -> None:
        """Wait until `count` answers have come back (the moment a fault is injected 'mid-load')."""
        async with self._progress:
            await self._progress.wait_for(lambda: len(self.answers) >= count)

    def assert_only(self, allowed: set[int]) -> None:
        bad = [a for a in self.answers if a.status not in allowed]
        assert not bad, f"unexpected answers {Counter(a.status for a in bad)}: {[a.body for a in bad[:3]]}"

    def assert_503s_are_problems(self) -> None:
        for a in self.answers:
            if a.status == 503:
                assert a.headers is not None and a.headers["content-type"] == "application/problem+json"
                assert a.headers.get("retry-after"), a.body


USERS = [bearer(f"U{i:03d}") for i in range(50)]


async def create_order(client: httpx.AsyncClient, traffic: Traffic, *, product_id: str, user: int,
                       quantity: int = 1) -> Answer:
    started = time.monotonic()
    try:
        r = await client.post("/api/preorder", json={"product_id": product_id, "quantity": quantity},
                              headers=USERS[user % len(USERS)])
        answer = Answer(r.status_code, time.monotonic() - started, _json(r), r.headers, started)
    except httpx.TransportError as exc:  # the body says which failure it was, for the assertion's message
        answer = Answer(0, time.monotonic() - started, {"transport_error": repr(exc)}, None, started)
    await traffic.record(answer)
    return answer


def _json(r: httpx.Response) -> dict[str, Any] | None:
    try:
        body = r.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def burst(client: httpx.AsyncClient, traffic: Traffic, *, product_id: str, count: int,
                concurrency: int = 100) -> None:
    """`count` creates of one unit each, at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await create_order(client, traffic, product_id=product_id, user=i)

    await asyncio.gather(*(one(i) for i in range(count)))


async def steady(client: httpx.AsyncClient, traffic: Traffic, stop: asyncio.Event, *, product_id: str,
                 workers: int = 20) -> None:
    """Creates from `workers` clients back to back until `stop` is set."""
    async def worker(w: int) -> None:
        while not stop.is_set():
            await create_order(client, traffic, product_id=product_id, user=w)

    await asyncio.gather(*(worker(w) for w in range(workers)))


# n deposit-paid orders of one product (1 unit, price 1000, deposit 100 paid) written straight into PostgreSQL with
# their history and deposit payment, as if each had been created and paid through the API (the sold counter's
# triggers count them). Their units are in Redis only once the product is (re)built from PostgreSQL.
_SEED_DEPOSIT_PAID = """
WITH o AS (
    INSERT INTO orders (id, product_id, user_id, quantity, status, amount_due, currency, pay_by, created_at,
                        updated_at, payment_plan, deposit_due, balance_due, balance_starts_at, balance_ends_at, paid,
                        payment_reference, amount_paid)
    SELECT gen_random_uuid(), $4, 'U' || (i % 500), 1, 'deposit_paid', 1000, 'USD', now() + interval '30 minutes',
           now(), now(), 'deposit', 100, 900, $2, $3, 100, $4 || '-DEP-' || i, 100
    FROM generate_series(1, $1::int) AS i
    RETURNING *
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
    SELECT id, NULL, 'pending', user_id, 'created', 1, 'created', to_jsonb(o) FROM o
    UNION ALL SELECT id, 'pending', 'pending', user_id, 'deposit payment', 2, 'payment_recorded', to_jsonb(o) FROM o
    UNION ALL SELECT id, 'pending', 'deposit_paid', user_id, 'deposit_confirmed', 3, 'deposit_paid', to_jsonb(o)
    FROM o
)
INSERT INTO payments (order_id, kind, reference, amount, currency, outcome, actor)
SELECT id, 'deposit', payment_reference, 100, 'USD', 'applied', user_id FROM o
"""


async def seed_deposit_paid(db: Any, n: int, product_id: str, balance_starts_at: Any, balance_ends_at: Any) -> None:
    """n deposit-paid orders of `product_id` (a deposit product: price 1000, deposit 100, stock >= n)."""
    await db.execute(_SEED_DEPOSIT_PAID, n, balance_starts_at, balance_ends_at, product_id)


async def new_product(client: httpx.AsyncClient, pid: str, **fields: Any) -> dict[str, Any]:
    body = {"id": pid, "name": f"Product {pid}", "price_amount": 1000, "currency": "USD", "total_stock": 100}
    body.update(fields)
    r = await client.post("/api/products", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return dict(r.json())
