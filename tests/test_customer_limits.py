"""Limits across products: a hoarder can't hold more than PREORDER_MAX_UNPAID_PER_CUSTOMER units unpaid at
once (409 unpaid-limit), a customer or address can't spread creates over many products past its rate (429),
and unknown products are refused from a negative cache after their first lookup (no PostgreSQL work)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from preorder.app import create_app
from preorder.orders.service import Orders
from preorder.stock.keys import UNPAID_RECOUNT_LEASE, customer_keys, product_keys
from preorder.workers import unpaid
from preorder.workers.unpaid import recount_unpaid, recount_unpaid_once
from tests.conftest import ON_CLUSTER, asgi_client, bearer, make_product, make_settings
from tests.invariants import assert_invariants

PROBLEM = "application/problem+json"
# Redis Cluster's layout (one ask per slot: the customer's, the address's) must decide the same as the single
# ask a single Redis gets; a single Redis runs either layout, so both are checked here. A cluster runs only its own
# (the single ask's keys span slots: CROSSSLOT, answered 503).
LAYOUTS = pytest.mark.parametrize("cluster_layout", [
    pytest.param(False, id="single",
                 marks=pytest.mark.skipif(ON_CLUSTER, reason="a Redis Cluster runs only its layout")),
    pytest.param(True, id="cluster-layout"),
])


async def _order(client: httpx.AsyncClient, pid: str, who: dict[str, str], qty: int = 1) -> httpx.Response:
    return await client.post("/api/preorder", json={"product_id": pid, "quantity": qty}, headers=who)


async def _products(client: httpx.AsyncClient, count: int, stock: int = 5) -> list[str]:
    pids = [f"H{i:03d}" for i in range(count)]
    for pid in pids:
        await make_product(client, pid, total_stock=stock)
    return pids


async def _reserved(redis: aioredis.Redis, pids: list[str]) -> int:
    return sum([int(await redis.hget(product_keys(p).stock, "reserved")) for p in pids])


async def _xacts(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                 "WHERE datname = current_database()"))


def _app(servers: tuple[str, str], **overrides: Any) -> FastAPI:
    return create_app(make_settings(*servers, **overrides))


async def test_a_hoarder_across_200_products_holds_at_most_the_unpaid_cap(servers, db, redis) -> None:
    app = _app(servers, max_unpaid_per_customer=10)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        pids = await _products(client, 200)
        hoarder = bearer("HOARDER")
        answers = await asyncio.gather(*(_order(client, pid, hoarder) for pid in pids))
        statuses = Counter(r.status_code for r in answers)
        assert statuses == {201: 10, 409: 190}, statuses
        refused = next(r for r in answers if r.status_code == 409)
        assert refused.headers["content-type"] == PROBLEM and refused.json()["type"] == "/problems/unpaid-limit"
        assert refused.json()["held"] == 10
        assert await db.fetchval("SELECT SUM(quantity) FROM orders WHERE user_id = 'HOARDER'") == 10
        assert await _reserved(redis, pids) == 10, "the refused creates were given back their reservations"
        assert int(await redis.get(customer_keys("HOARDER").unpaid)) == 10
        # Another customer is not held back by the hoarder.
        assert (await _order(client, pids[-1], bearer("OTHER"))).status_code == 201

        held = [r.json() for r in answers if r.status_code == 201]
        paid = held[0]
        pay = {"status": "paid", "payment": {"reference": "R1", "amount": paid["amount_due"]}}
        assert (await client.put(f"/api/preorder/{paid['order_id']}", json=pay, headers=hoarder)).is_success
        assert (await client.delete(f"/api/preorder/{held[1]['order_id']}", headers=hoarder)).is_success
        assert int(await redis.get(customer_keys("HOARDER").unpaid)) == 8, "paying and cancelling gave units back"
        more = await asyncio.gather(*(_order(client, pid, hoarder) for pid in pids[100:105]))
        assert Counter(r.status_code for r in more) == {201: 2, 409: 3}
        created = {r["id"]: 1 for r in await db.fetch("SELECT id::text FROM orders")}
        await assert_invariants(db, redis, created=created)


@LAYOUTS
async def test_the_unpaid_cap_counts_units_not_orders(servers, db, redis, cluster_layout) -> None:
    app = _app(servers, max_unpaid_per_customer=5)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        app.state.stock.customers._cluster = cluster_layout
        await make_product(client, total_stock=100)
        who = bearer("U1")
        assert (await _order(client, "P1001", who, qty=4)).status_code == 201
        r = await _order(client, "P1001", who, qty=2)
        assert r.status_code == 409 and r.json()["type"] == "/problems/unpaid-limit", r.text
        assert (await _order(client, "P1001", who, qty=1)).status_code == 201
        assert await db.fetchval("SELECT SUM(quantity) FROM orders") == 5


@LAYOUTS
async def test_a_customer_spreading_creates_over_products_is_rate_limited(servers, db, redis, cluster_layout) -> None:
    app = _app(servers, customer_rate_limit=5, rate_limit_window_s=60)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        app.state.stock.customers._cluster = cluster_layout
        pids = await _products(client, 8)
        who = bearer("BOT")
        answers = [await _order(client, pid, who) for pid in pids]
        assert [r.status_code for r in answers] == [201] * 5 + [429] * 3
        assert answers[-1].json()["type"] == "/problems/rate-limited"
        assert "customer" in answers[-1].json()["detail"] and 1 <= int(answers[-1].headers["retry-after"]) <= 60
        assert await db.fetchval("SELECT count(*) FROM orders") == 5
        assert await _reserved(redis, pids) == 5, "a refused create holds nothing"
        assert await redis.get(customer_keys("BOT").unpaid) == b"5", "429s take no unpaid units"


@LAYOUTS
async def test_one_address_spreading_creates_over_customers_is_rate_limited(servers, db, redis, cluster_layout
                                                                            ) -> None:
    app = _app(servers, address_rate_limit=4, rate_limit_window_s=60)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        app.state.stock.customers._cluster = cluster_layout
        pids = await _products(client, 3)
        answers = [await _order(client, pids[i % 3], bearer(f"C{i}")) for i in range(6)]
        assert [r.status_code for r in answers] == [201] * 4 + [429] * 2
        assert "address" in answers[-1].json()["detail"]
        assert [await redis.get(customer_keys(f"C{i}").unpaid) for i in (4, 5)] == [None, None]


async def test_unknown_products_cost_postgresql_one_lookup_then_nothing(servers, db, redis) -> None:
    app = _app(servers, unknown_product_ttl_s=60)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        who = bearer("U1")
        first = await _order(client, "NOPE", who)
        assert first.status_code == 404 and first.json()["type"] == "/problems/not-found"
        assert await redis.exists(product_keys("NOPE").absent), "every process now sees it unknown"
        app.state.stock.unknown.clear("NOPE")  # as another process would be: only the Redis marker knows
        await app.state.pool.close()  # closing flushes the pool's statistics; a closed pool can't be used
        before = await _xacts(db)
        answers = await asyncio.gather(*(_order(client, "NOPE", who) for _ in range(50)))
        assert {r.status_code for r in answers} == {404}
        assert await _xacts(db) == before, "refused from Redis and memory, PostgreSQL untouched"


async def test_creating_a_product_lifts_its_unknown_mark_at_once(client, db, redis) -> None:
    assert (await _order(client, "P1001", bearer("U1"))).status_code == 404
    await make_product(client)
    assert not await redis.exists(product_keys("P1001").absent)
    assert (await _order(client, "P1001", bearer("U1"))).status_code == 201


async def test_unknown_products_leave_no_per_product_state_behind(app, client) -> None:
    stock = app.state.stock
    stock.unknown = type(stock.unknown)(60, max_size=100)
    await asyncio.gather(*(_order(client, f"N{i}", bearer("U1")) for i in range(300)))
    assert len(stock.unknown) <= 100, "the negative cache is bounded"
    assert len(stock._loading) == 0, "no loading lock outlives its load"


async def test_the_recount_repairs_a_leaked_unpaid_count(app, client, db, redis: aioredis.Redis) -> None:
    await make_product(client)
    assert (await _order(client, "P1001", bearer("U1"), qty=3)).status_code == 201
    await redis.set(customer_keys("U1").unpaid, 9)  # as a process killed mid-create would leave it
    await redis.set(customer_keys("GONE").unpaid, 4)  # a customer with nothing pending at all
    orders: Orders = app.state.orders
    assert await recount_unpaid(orders) == 2
    assert await redis.get(customer_keys("U1").unpaid) == b"3"
    assert not await redis.exists(customer_keys("GONE").unpaid)
    await redis.delete(customer_keys("U1").unpaid)  # Redis lost it
    assert await recount_unpaid(orders) == 1 and await redis.get(customer_keys("U1").unpaid) == b"3"
    assert await recount_unpaid(orders) == 0, "nothing left to repair"


async def test_the_recount_reads_the_counters_a_page_at_a_time(app, redis: aioredis.Redis) -> None:
    """2,500 customers' counters: read with one MGET per page of 1,000 keys (a GET each took 2,500 round trips
    of the web worker's loop every interval). A cluster reads one MGET per slot, so there only the values count."""
    counters = {f"C{i:04d}": str(i % 7 + 1) for i in range(2_500)}
    written = {customer_keys(user).unpaid: units for user, units in counters.items()}
    await (redis.mset_nonatomic(written) if ON_CLUSTER else redis.mset(written))
    customers = app.state.orders.stock.customers
    before = {} if ON_CLUSTER else await redis.info("commandstats")
    seen = {user: units async for user, units in customers.counted()}
    assert seen == counters
    if not ON_CLUSTER:
        after = await redis.info("commandstats")

        def calls(command: str) -> int:
            return int(after.get(f"cmdstat_{command}", {}).get("calls", 0)) - int(
                before.get(f"cmdstat_{command}", {}).get("calls", 0))

        assert calls("get") == 0
        assert calls("mget") == 3


async def test_one_process_recounts_per_interval(app, client, redis: aioredis.Redis, monkeypatch) -> None:
    """Every process wakes each interval; the one that takes the lease recounts, the others skip the pass and its
    read of every pending order. Once the lease lapses (90% of the interval), the next wake recounts again."""
    await make_product(client)
    assert (await _order(client, "P1001", bearer("U1"), qty=2)).status_code == 201
    await redis.set(customer_keys("U1").unpaid, 7)
    orders: Orders = app.state.orders
    reads = []
    real_read = unpaid.repo.unpaid_by_customer

    async def read_pending(conn: Any) -> dict[str, int]:
        reads.append(1)
        return await real_read(conn)

    monkeypatch.setattr(unpaid.repo, "unpaid_by_customer", read_pending)
    passes = await asyncio.gather(*(recount_unpaid_once(orders, every_s=30) for _ in range(4)))
    assert sorted(passes, key=str) == [1, None, None, None], "one process recounted, three skipped"
    assert len(reads) == 1, "the three that skipped read nothing from PostgreSQL"
    assert await redis.get(customer_keys("U1").unpaid) == b"2"
    assert 0 < await redis.pttl(UNPAID_RECOUNT_LEASE) <= 27_000

    await redis.set(customer_keys("U1").unpaid, 5)
    await redis.delete(UNPAID_RECOUNT_LEASE)  # as it lapses by its TTL, checked above
    assert await recount_unpaid_once(orders, every_s=30) == 1
    assert len(reads) == 2 and await redis.get(customer_keys("U1").unpaid) == b"2"


async def test_a_sell_out_moment_gives_every_refused_customer_back_in_one_pipeline(client, db, redis, app):
    """300 creates at once for 10 units: the 290 refused ones each give their customer's unit back. Queued in
    one loop turn they go through the batcher, in one call (per cluster slot); one call each took a pooled
    connection each, and on a loaded machine some waited past the pool's bound and answered 503 instead of 409."""
    await make_product(client, total_stock=10)
    opened_before = int((await redis.info("stats"))["total_connections_received"])
    answers = await asyncio.gather(*(_order(client, "P1001", bearer(f"S{i:03d}")) for i in range(300)))
    opened = int((await redis.info("stats"))["total_connections_received"]) - opened_before

    assert Counter(a.status_code for a in answers) == {201: 10, 409: 290}
    assert opened <= 8, f"{opened} new Redis connections for one burst"
    customers = app.state.orders.stock.customers
    for i, answer in enumerate(answers):
        assert await customers.unpaid(f"S{i:03d}") == (1 if answer.status_code == 201 else 0)
    await assert_invariants(db, redis)
