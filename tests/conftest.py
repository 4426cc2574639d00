"""Real PostgreSQL and Redis for every test: embedded ones (pip-installed binaries) by default, or the servers
named by PREORDER_TEST_DATABASE_URL / PREORDER_TEST_REDIS_URL when set. No mocks of either anywhere."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from preorder import migrate
from preorder.app import create_app
from preorder.auth import mint_token
from preorder.db import asyncpg_dsn
from preorder.embedded import EmbeddedPostgres, EmbeddedRedis
from preorder.settings import Settings

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


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
                rd = EmbeddedRedis(Path(tmp) / "redis", persist=False)
                started.append(rd)
                redis_url = rd.start()
            migrate.upgrade(db_url)
            yield db_url, redis_url
        finally:
            for server in reversed(started):
                server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone, without persistence: killing it loses every key."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_settings(db_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test", "database_url": db_url, "redis_url": redis_url, "jwt_secret": SECRET,
        "workers_enabled": False, "rate_limit_per_user": 10_000, "rate_limit_per_client": 100_000,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def settings(servers: tuple[str, str]) -> Settings:
    return make_settings(*servers)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    await conn.execute("TRUNCATE refunds, idempotency_keys, order_events, orders, products")
    yield conn
    await conn.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def app(settings: Settings, db: asyncpg.Connection, redis: aioredis.Redis) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@contextlib.asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client that talks to the app in process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        yield c


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An app built from these settings, running (its lifespan entered), and an in-process client for it."""
    application = create_app(settings)
    async with application.router.lifespan_context(application), asgi_client(application) as c:
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
