"""A real `preorder serve` as an operator runs it: JSON access lines, metrics summed over `--workers 2`, every API
call bounded when PostgreSQL or Redis hangs, and a SIGTERM under load that loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN, bearer
from tests.harness import PgProxy, Server, Traffic, eventually, new_product, server_env, steady
from tests.invariants import assert_invariants

pytestmark = pytest.mark.faults
ME = bearer("U-ops")
BOUND_S = 2.0  # every API call answers within this while a dependency hangs
# Timeouts that fit the bound: acquire 0.5 s, statement 0.5 s (+0.25 s client margin), Redis 0.5 s.
TIGHT = {"PREORDER_DB_STATEMENT_TIMEOUT_MS": "500", "PREORDER_DB_CONNECT_TIMEOUT_S": "0.5",
         "PREORDER_DB_ACQUIRE_TIMEOUT_S": "0.5", "PREORDER_REDIS_TIMEOUT_S": "0.5"}


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, database_url: str, redis_url: str, args: tuple[str, ...] = (),
                  **env: str) -> AsyncIterator[Server]:
    server = Server(server_env(database_url, redis_url, **env), tmp_path, args=args)
    try:
        await server.start(within=90)  # worker processes import everything anew: slow on a busy 2-core machine
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def proxied(url: str) -> AsyncIterator[PgProxy]:
    proxy = PgProxy(url)  # forwards any TCP service named by a URL: PostgreSQL or Redis
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def log_lines(server: Server) -> list[dict[str, Any]]:
    lines = []
    for path in server.log_dir.glob(f"serve-{server.port}-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    return lines


# ---- logs -----------------------------------------------------------------------------------------------

async def test_serve_writes_one_json_access_line_per_request_and_logs_errors_with_their_exception(
    tmp_path, settings, db, own_redis
):
    async with proxied(settings.database_url) as pg, running(
        tmp_path, database_url=pg.url, redis_url=own_redis.url, **TIGHT
    ) as server, server.client() as c:
        await new_product(c, "LOG")
        ok = await c.get("/api/products/LOG", headers={"X-Request-ID": "req-ok-1"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-ok-1"
        pg.cut("reset")
        down = await c.get("/api/products/LOG", headers={"X-Request-ID": "req-down-1"})
        assert down.status_code == 503

        async def logged() -> list[dict[str, Any]]:
            lines = log_lines(server)
            assert {"req-ok-1", "req-down-1"} <= {x.get("request_id") for x in lines if x.get("event") == "request"}
            return lines

        lines = await eventually(logged, within=5)
    access = {x["request_id"]: x for x in lines if x.get("event") == "request"}
    assert access["req-ok-1"] | {"duration_ms": 0} == {
        "event": "request", "method": "GET", "route": "/api/products/{product_id}", "status": 200,
        "duration_ms": 0, "request_id": "req-ok-1", "problem": None, "level": "info",
        "timestamp": access["req-ok-1"]["timestamp"]}
    assert access["req-down-1"]["status"] == 503 and access["req-down-1"]["problem"] == "unavailable"
    errors = [x for x in lines if x.get("request_id") == "req-down-1" and x.get("event") != "request"]
    assert errors and "Error" in errors[0]["event"], "the outage is logged with its exception"
    assert "127.0.0.1" not in down.text, "while the client gets no internals"


# ---- metrics with several workers -------------------------------------------------------------------------

async def test_metrics_are_summed_over_the_workers_of_serve(tmp_path, settings, db, own_redis):
    async with running(tmp_path, database_url=settings.database_url, redis_url=own_redis.url,
                       args=("--workers", "2")) as server:
        await eventually(lambda: _workers_started(server, 2), within=90)
        async with server.client() as c:
            await new_product(c, "MP", total_stock=1000)
        # Separate connections, which the kernel spreads over both workers' accept calls.
        for i in range(16):
            async with server.client() as c:
                for _ in range(5):
                    r = await c.post("/api/preorder", json={"product_id": "MP", "quantity": 1},
                                     headers=bearer(f"U{i}"))
                    assert r.status_code == 201, r.text
        totals = set()
        for _ in range(8):
            async with server.client() as c:
                totals.add(_sample(await c.get("/metrics"), "preorder_orders_created_total"))
        assert totals == {80.0}, f"every scrape, whichever worker answers it, sums both workers: {totals}"


async def _workers_started(server: Server, n: int) -> None:
    started = [x for x in log_lines(server) if "Application startup complete" in str(x.get("event"))]
    assert len(started) >= n, server.log_tail()


def _sample(r: httpx.Response, name: str, **labels: str) -> float:
    assert r.status_code == 200
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


# ---- every call bounded while a dependency hangs -------------------------------------------------------

async def every_call(c: httpx.AsyncClient, order_id: str) -> dict[str, httpx.Response]:
    """One of each API call, each timed: none may take longer than BOUND_S."""
    calls = {
        "GET one": lambda: c.get(f"/api/preorder/{order_id}", headers=ME),
        "list": lambda: c.get("/api/preorder", headers=ME),
        "POST": lambda: c.post("/api/preorder", json={"product_id": "HB", "quantity": 1}, headers=ME),
        "PUT": lambda: c.put(f"/api/preorder/{order_id}", json={"status": "cancelled"}, headers=ME),
        "DELETE": lambda: c.delete(f"/api/preorder/{order_id}", headers=ME),
        "events": lambda: c.get(f"/api/preorder/{order_id}/events", headers=ME),
        "product": lambda: c.get("/api/products/HB"),
        "products": lambda: c.get("/api/products"),
        "new product": lambda: c.post("/api/products", headers=ADMIN, json={
            "id": "HB2", "name": "x", "price_amount": 1, "currency": "USD", "total_stock": 1}),
    }
    answers = {}
    for name, call in calls.items():
        started = time.monotonic()
        answers[name] = await call()
        took = time.monotonic() - started
        assert took < BOUND_S, f"{name} took {took:.2f}s"
    return answers


async def recovered(c: httpx.AsyncClient, order_id: str) -> None:
    answers = await every_call(c, order_id)
    assert {n: r.status_code for n, r in answers.items() if r.status_code >= 500} == {}


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json" and int(r.headers["retry-after"]) >= 1


@contextlib.asynccontextmanager
async def hanging(tmp_path: Path, settings: Any, redis_url: str, *, dependency: str
                  ) -> AsyncIterator[tuple[PgProxy, httpx.AsyncClient, str]]:
    """A server whose PostgreSQL or Redis is behind a proxy, a product HB and one order of it. On the way out the
    proxy is restored, and every call must answer without a 5xx again by itself (no restart)."""
    urls = {"database_url": settings.database_url, "redis_url": redis_url}
    async with proxied(urls[dependency]) as proxy:
        urls[dependency] = proxy.url
        async with running(tmp_path, **urls, **TIGHT) as server, server.client(timeout=10) as c:
            await new_product(c, "HB", total_stock=100)
            order = (await c.post("/api/preorder", json={"product_id": "HB", "quantity": 1}, headers=ME)).json()
            yield proxy, c, order["order_id"]
            proxy.restore()
            await eventually(lambda: recovered(c, order["order_id"]), within=20, interval=0.5)


async def test_postgresql_blackhole_every_call_answers_503_in_time_and_recovers_alone(
    tmp_path, settings, db, own_redis
):
    async with hanging(tmp_path, settings, own_redis.url, dependency="database_url") as (pg, c, order_id):
        pg.cut("blackhole")
        for _ in range(2):  # the first round meets hung connections, the second fresh connects that hang
            answers = await every_call(c, order_id)
            for r in answers.values():
                assert_unavailable(r)


async def test_redis_hung_every_call_answers_in_time_and_recovers_alone(tmp_path, settings, db, own_redis):
    async with hanging(tmp_path, settings, own_redis.url, dependency="redis_url") as (rd, c, order_id):
        rd.cut("blackhole")
        for _ in range(2):
            answers = await every_call(c, order_id)
            for name in ("POST", "product", "products"):  # the calls that need Redis
                assert_unavailable(answers[name])
            for r in answers.values():  # the others answer from PostgreSQL alone
                assert r.status_code < 500 or (r.status_code == 503 and r.headers.get("retry-after"))


# ---- graceful shutdown ------------------------------------------------------------------------------------

async def test_sigterm_under_load_finishes_in_flight_orders_and_exits_0(tmp_path, settings, db, redis):
    env = {"PREORDER_SHUTDOWN_TIMEOUT_S": "10", "PREORDER_SWEEP_INTERVAL_S": "5"}
    async with running(tmp_path, database_url=settings.database_url, redis_url=settings.redis_url, **env) as server:
        traffic, stop = Traffic(), asyncio.Event()
        async with server.client(timeout=15) as c:
            await new_product(c, "SIG", total_stock=100_000)
            load = asyncio.create_task(steady(c, traffic, stop, product_id="SIG", workers=40))
            await traffic.reached(300)
            assert server.process is not None
            started = time.monotonic()
            os.kill(server.process.pid, signal.SIGTERM)
            code = await asyncio.to_thread(server.process.wait, 15)
            took = time.monotonic() - started
            stop.set()
            await load
    assert code == 0, server.log_tail()
    assert took < 10, f"stopped in {took:.1f}s, beyond PREORDER_SHUTDOWN_TIMEOUT_S"
    traffic.assert_only({0, 201})  # 0: refused connection once it stopped accepting; never a 5xx
    assert len(traffic.created) >= 300
    # Every 201 is stored, and no hold leaked: no reconciler ran after the stop, none was needed.
    await assert_invariants(db, redis, created=traffic.created)


async def test_the_growing_tables_are_vacuumed_every_20000_new_rows(db) -> None:
    """Migration 0010: autovacuum takes the orders and their events every 20,000 inserted rows rather than every
    fifth of the table, so a vacuum never marks minutes of orders visible at once (a WAL flood of full-page images
    on a table of millions, README "Performance", sustained)."""
    rows = await db.fetch("SELECT relname, reloptions FROM pg_class WHERE relname = ANY($1::text[]) ORDER BY relname",
                          ["order_events", "orders"])
    assert [(r["relname"], sorted(r["reloptions"] or ())) for r in rows] == [
        (table, ["autovacuum_vacuum_insert_scale_factor=0", "autovacuum_vacuum_insert_threshold=20000"])
        for table in ("order_events", "orders")]
