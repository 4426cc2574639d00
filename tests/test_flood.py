"""A bot floods a real `preorder serve` with 20,000 creates for products that do not exist. Every answer is 404
or 429, the process's memory and PostgreSQL's transaction count stay within the bounds stated below, and a
real product's creates meanwhile keep the latency they have under an equal flood of ordinary refusals."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx

from preorder.db import asyncpg_dsn
from preorder.settings import Settings
from tests.conftest import bearer
from tests.harness import Server, new_product, server_env

FLOOD = 20_000
DISTINCT = 5_000  # made-up product ids, each asked for four times
CONCURRENCY = 32
CUSTOMER_LIMIT = 50  # creates per second per customer, across products
BASELINE = 5_000  # creates for a sold-out product: the ordinary flash-sale refusal, for the latency baseline
# Bounds. Memory: the negative cache, key cache and token cache are bounded (~1 kB an entry, < 15 MB in all);
# the rest is allocator noise. Transactions: only creates the customer's rate admits can reach PostgreSQL, one
# lookup each, so at most CUSTOMER_LIMIT per second of flood (the 20,000 creates used to cost ~20,000).
RSS_GROWTH_MB = 40
# Real creates' latency under the flood vs under the baseline flood, by median and p90 (the tail is the noisier
# on a loaded 2-core machine). Before unknown products were cached, the flood took p99 to ~800 ms, 40x.
MEDIAN_RATIO, P90_RATIO = 3.0, 5.0
BOT_AUTH = bearer("BOT")["Authorization"].encode()
# Real customers, in turn, so that none of them reaches the per-customer rate however fast the machine.
BUYERS = [bearer(f"BUYER{i}") for i in range(100)]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _xacts(settings: Settings) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        return int(await conn.fetchval("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                       "WHERE datname = current_database()"))
    finally:
        await conn.close()


async def _flood(port: int, ids: list[str], answers: Counter[int]) -> None:
    """CONCURRENCY keep-alive connections, each sending its next create as soon as the last was answered. Raw
    HTTP/1.1 on asyncio streams: an HTTP client library would spend more CPU per request than the server."""
    todo = iter(ids)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for pid in todo:
                body = b'{"product_id":"%s","quantity":1}' % pid.encode()
                writer.write(b"POST /api/preorder HTTP/1.1\r\nHost: flood\r\nContent-Type: application/json\r\n"
                             b"Authorization: %s\r\nContent-Length: %d\r\n\r\n%s" % (BOT_AUTH, len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(length)
                answers[int(head[9:12])] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(CONCURRENCY)))


async def _real_creates_during(client: httpx.AsyncClient, flood: asyncio.Task[None]) -> list[float]:
    took = []
    while not flood.done():
        started = time.perf_counter()
        r = await client.post("/api/preorder", json={"product_id": "REAL", "quantity": 1},
                              headers=BUYERS[len(took) % len(BUYERS)])
        took.append(time.perf_counter() - started)
        assert r.status_code == 201, r.text
    await flood
    return took


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


async def test_a_flood_of_unknown_products_costs_no_database_work(settings, db, redis, tmp_path) -> None:
    env = server_env(settings.database_url, settings.redis_url, PREORDER_CUSTOMER_RATE_LIMIT=str(CUSTOMER_LIMIT),
                     # The background loops and the events relay poll PostgreSQL on their own clock, whatever the
                     # requests do: off, so the count is the requests' alone.
                     PREORDER_WORKERS_ENABLED="false", PREORDER_RELAY_ENABLED="false",
                     PREORDER_UNKNOWN_PRODUCT_TTL_S="120")
    server = Server(env, tmp_path)
    xacts_before = await _xacts(settings)
    await server.start()
    try:
        async with server.client() as client:
            await new_product(client, "REAL", total_stock=1_000_000)
            await new_product(client, "GONE", total_stock=1)
            assert (await client.post("/api/preorder", json={"product_id": "GONE", "quantity": 1},
                                      headers=BUYERS[0])).status_code == 201
            baseline_answers: Counter[int] = Counter()
            await _flood(server.port, ["GONE"] * 500, baseline_answers)  # warm-up
            assert server.process is not None
            rss_before = _rss_mb(server.process.pid)

            baseline = asyncio.create_task(_flood(server.port, ["GONE"] * BASELINE, baseline_answers))
            normal = await _real_creates_during(client, baseline)
            assert set(baseline_answers) <= {409, 429}, baseline_answers

            answers: Counter[int] = Counter()
            ids = [f"X{i % DISTINCT}" for i in range(FLOOD)]
            started = time.monotonic()
            flood = asyncio.create_task(_flood(server.port, ids, answers))
            flooded = await _real_creates_during(client, flood)
            flood_s = time.monotonic() - started
            rss_after = _rss_mb(server.process.pid)
    finally:
        server.stop()  # a backend flushes its statistics when it exits: the count below is complete
    xacts = await _xacts(settings) - xacts_before

    print(f"\nflood {FLOOD} in {flood_s:.1f} s: {dict(answers)}; PostgreSQL transactions {xacts}; "
          f"RSS {rss_before:.0f} -> {rss_after:.0f} MB; real create p50 {_p(normal, 50) * 1e3:.1f} -> "
          f"{_p(flooded, 50) * 1e3:.1f} ms, p90 {_p(normal, 90) * 1e3:.1f} -> {_p(flooded, 90) * 1e3:.1f} ms")
    assert set(answers) <= {404, 429} and sum(answers.values()) == FLOOD, answers
    assert answers[429] > 0 and answers[404] > 0, answers
    real_creates = len(normal) + len(flooded) + 1
    allowed = CUSTOMER_LIMIT * (flood_s + 2) + real_creates + 100  # + group-committed writes, start-up, products
    assert xacts <= allowed, f"{xacts} transactions for {FLOOD} unknown-product creates (bound {allowed:.0f})"
    assert rss_after - rss_before <= RSS_GROWTH_MB, (rss_before, rss_after)
    assert _p(flooded, 50) <= MEDIAN_RATIO * _p(normal, 50), (_p(normal, 50), _p(flooded, 50))
    assert _p(flooded, 90) <= P90_RATIO * _p(normal, 90), (_p(normal, 90), _p(flooded, 90))
    assert len(flooded) >= 20, "enough real creates ran during the flood to compare"
