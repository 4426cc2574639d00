"""The PostgreSQL pool: created once in the lifespan, handed out by the `Pool` dependency."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
import orjson
from fastapi import Depends, Request

from preorder.settings import Settings

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

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


async def create_pool(settings: Settings) -> PgPool:
    # min_size=0: the app starts (and /readyz reports) even while PostgreSQL is down.
    pool = await asyncpg.create_pool(
        asyncpg_dsn(settings.database_url),
        min_size=0,
        max_size=settings.db_pool_max,
        timeout=settings.db_connect_timeout_s,
        command_timeout=settings.db_statement_timeout_ms / 1000 + 1,
        max_inactive_connection_lifetime=300,
        init=_init_connection,
        reset=_keep_session,
        server_settings={
            "statement_timeout": str(settings.db_statement_timeout_ms),
            "idle_in_transaction_session_timeout": str(settings.db_statement_timeout_ms * 2),
            "application_name": "preorder",
        },
    )
    assert pool is not None
    return pool


async def get_pool(request: Request) -> PgPool:
    pool: PgPool = request.app.state.pool
    return pool


Pool = Annotated[PgPool, Depends(get_pool)]
