"""The PostgreSQL pool: created once in the lifespan, handed out by the `Pool` dependency."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
import orjson
from fastapi import Depends, Request

from preorder import metrics
from preorder.settings import Settings

if TYPE_CHECKING:
    from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

    PgPool = asyncpg.Pool[Any]
    PgConn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
else:
    PgPool, PgConn = asyncpg.Pool, asyncpg.Connection

# Errors that mean "PostgreSQL is not answering right now": the request gets 503, never 500.
UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
    )


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """What a connection needs on its way back to the pool: nothing beyond asyncpg's own rollback of an open
    transaction. The service sets no session state (no SET, LISTEN, advisory locks or cursors outside a
    transaction), so asyncpg's default reset query (RESET ALL, UNLISTEN *, ...) would be one more round trip
    per release for nothing: measured on the create benchmark."""


def asyncpg_dsn(url: str) -> str:
    """Accept SQLAlchemy-style URLs too (postgresql+asyncpg://), as alembic uses them."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


class BoundedPool(PgPool):
    """asyncpg's pool with a default acquire timeout, so no caller (a read, a status change, a worker, the
    pool's own fetch helpers) can wait for a connection without bound; and gauges of connections in use and
    acquires waiting."""

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout = acquire_timeout

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext[Any]:
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)

    async def _acquire(self, timeout: float | None) -> PoolConnectionProxy[Any]:  # noqa: ASYNC109
        with metrics.POOL_WAITING.track_inprogress():
            conn: PoolConnectionProxy[Any] = await super()._acquire(timeout)  # type: ignore[misc]
        metrics.POOL_IN_USE.inc()
        return conn

    async def release(  # asyncpg's signature
        self, connection: PoolConnectionProxy[Any], *, timeout: float | None = None  # noqa: ASYNC109
    ) -> None:
        metrics.POOL_IN_USE.dec()
        await super().release(connection, timeout=timeout)


async def create_pool(settings: Settings) -> PgPool:
    # min_size=0: the app starts (and /readyz reports) even while PostgreSQL is down.
    pool = await BoundedPool(
        asyncpg_dsn(settings.database_url),
        acquire_timeout=settings.db_acquire_timeout_s,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        max_queries=50_000,
        setup=None,
        loop=None,
        min_size=0,
        max_size=settings.db_pool_max,
        timeout=settings.db_connect_timeout_s,
        # Later than the server's statement timeout (so a slow statement ends with PostgreSQL's clean error), but
        # bounded: with PostgreSQL hung nothing answers at all, and this is what ends the wait.
        command_timeout=_client_timeout(settings),
        max_inactive_connection_lifetime=300,
        init=_init_connection,
        reset=_keep_session,
        server_settings={
            "statement_timeout": str(settings.db_statement_timeout_ms),
            "idle_in_transaction_session_timeout": str(settings.db_statement_timeout_ms * 2),
            "application_name": "preorder",
        },
    )
    metrics.POOL_MAX.set(settings.db_pool_max)
    return pool


def _client_timeout(settings: Settings) -> float:
    statement_s = settings.db_statement_timeout_ms / 1000
    return statement_s + min(1.0, statement_s / 2)


async def get_pool(request: Request) -> PgPool:
    pool: PgPool = request.app.state.pool
    return pool


Pool = Annotated[PgPool, Depends(get_pool)]
