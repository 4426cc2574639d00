"""`preorder dev`: embedded PostgreSQL, Redis and NATS JetStream (data kept under .preorder/dev), migrated, a demo
product, tokens printed, the API and its docs on :8000. Ctrl-C stops the servers it started."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import uvicorn

from preorder import migrate as migrations
from preorder.app import create_app
from preorder.auth import mint_token
from preorder.cli import DEMO_PRODUCT, dev_secret
from preorder.db import asyncpg_dsn
from preorder.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis, data_root
from preorder.products import repository as products
from preorder.settings import Settings


def run_dev(*, port: int) -> int:
    root = data_root() / "dev"
    configured = Settings(env="dev")
    started: list[Any] = []
    try:
        db_url = configured.database_url or _start(EmbeddedPostgres(root / "postgres"), started)
        redis_url = configured.redis_url or _start(EmbeddedRedis(root / "redis", persist=True), started)
        nats_url = configured.nats_url or _start(EmbeddedNats(root / "nats"), started)
        migrations.upgrade(db_url)
        # Webhook endpoints on this machine (a receiver you run next to it) are what development needs.
        settings = Settings(env="dev", database_url=db_url, redis_url=redis_url, nats_url=nats_url,
                            jwt_secret=configured.jwt_secret or dev_secret(root), webhook_allow_private=True,
                            relay_process=False)  # one process: the relay runs inside it
        asyncio.run(_seed(settings))
        _print_welcome(settings, port)
        uvicorn.run(create_app(settings), host="127.0.0.1", port=port, loop="uvloop", access_log=False,
                    log_config=None)
    finally:
        for server in reversed(started):
            server.stop()
        if started:
            print("embedded servers stopped; data kept under", root)
    return 0


def _start(server: EmbeddedPostgres | EmbeddedRedis | EmbeddedNats, started: list[Any]) -> str:
    url = server.start()
    started.append(server)
    return url


async def _seed(settings: Settings) -> None:
    pool = await asyncpg.create_pool(asyncpg_dsn(settings.database_url), min_size=1, max_size=1)
    assert pool is not None
    try:
        await products.insert(pool, dict(DEMO_PRODUCT))
    finally:
        await pool.close()


def _print_welcome(settings: Settings, port: int) -> None:
    customer = mint_token(settings, sub="U123", role="customer")
    admin = mint_token(settings, sub="admin", role="admin")
    print(f"""
preorder dev
  PostgreSQL  {settings.database_url}
  Redis       {settings.redis_url}
  NATS        {settings.nats_url}   (JetStream stream PREORDER, subjects preorder.order.>)
  demo product P1001 (stock {DEMO_PRODUCT['total_stock']}, limit {DEMO_PRODUCT['per_user_limit']} per customer)

  customer U123 token:
    {customer}
  admin token:
    {admin}

  docs: http://127.0.0.1:{port}/docs   (Authorize with a token above)
  try:  curl -s -X POST http://127.0.0.1:{port}/api/preorder -H "Authorization: Bearer $TOKEN" \\
          -H 'Content-Type: application/json' -d '{{"product_id": "P1001", "quantity": 2, "user_id": "U123"}}'

  watch the events (another terminal):
        .venv/bin/preorder events --nats-url {settings.nats_url} --from-start
  or pull them:  curl -s http://127.0.0.1:{port}/api/events -H "Authorization: Bearer $ADMIN_TOKEN"
""", flush=True)
