"""I1-I4 under the faults DESIGN.md names, injected for real: a refused or stale order write (in process), Redis
flushed, its scripts flushed, Redis restarted empty, the app killed with SIGKILL, PostgreSQL cut away, and two
app processes on one hot product (real `preorder serve` subprocesses: two of them, or one with --workers 2)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx
import pytest

from preorder import db as dbmod
from preorder.cache import RedisClient
from preorder.stock.keys import product_keys
from preorder.stock.service import Stock
from preorder.workers.reconciler import settle_all
from tests.conftest import ON_CLUSTER, bearer, make_product, make_settings, serving
from tests.harness import (
    USERS,
    PgProxy,
    Server,
    Traffic,
    burst,
    eventually,
    new_product,
    steady,
)
from tests.invariants import assert_invariants

ME = bearer("U-fault")
ONE = {"product_id": "P1001", "quantity": 3}
SETTLE_S = 20  # orphan_hold_s of the subprocesses (2.5 s) plus a few sweeps, with room for a slow machine


# ---- compensation: the order write fails after the reservation (in process) ------------------------------

@contextlib.asynccontextmanager
async def refusing_order_inserts(db: asyncpg.Connection) -> AsyncIterator[None]:
    """PostgreSQL itself refuses every INSERT into orders while this is open."""
    await db.execute("CREATE FUNCTION refuse_orders() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$BEGIN RAISE EXCEPTION 'injected: orders refused'; END$$")
    await db.execute("CREATE TRIGGER refuse_orders BEFORE INSERT ON orders "
                     "FOR EACH ROW EXECUTE FUNCTION refuse_orders()")
    try:
        yield
    finally:
        await db.execute("DROP TRIGGER refuse_orders ON orders; DROP FUNCTION refuse_orders()")


def assert_retryable_problem(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["status"] == 503


async def assert_nothing_held(redis: RedisClient, product_id: str = "P1001") -> None:
    k = product_keys(product_id)
    stock, holds, users = k.stock, k.holds, k.users
    assert int(await redis.hget(stock, "reserved")) == 0
    assert await redis.hlen(holds) == 0 and await redis.hlen(users) == 0


async def test_refused_order_write_releases_the_reservation_at_once_and_answers_503(client, db, redis):
    await make_product(client, total_stock=5)
    async with refusing_order_inserts(db):
        answers = [await client.post("/api/preorder", json=ONE, headers=ME) for _ in range(4)]
        for r in answers:
            assert_retryable_problem(r)
        await assert_nothing_held(redis)  # at once: no reconciler has run in this process
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    r = await client.post("/api/preorder", json=ONE, headers=ME)
    assert r.status_code == 201, "4 refused writes of 3 units leaked nothing: 3 of 5 still fit"
    await assert_invariants(db, redis, created={r.json()["order_id"]: 3})


async def test_order_write_stuck_behind_a_lock_times_out_with_503_and_releases(settings, db, redis):
    fast = make_settings(settings.database_url, settings.redis_url,
                         db_statement_timeout_ms=300, write_deadline_s=1, orphan_hold_s=2)
    async with serving(fast) as c:
        await make_product(c, total_stock=5)
        async with db.transaction():
            await db.execute("SELECT 1 FROM products WHERE id = 'P1001' FOR UPDATE")
            started = time.monotonic()
            r = await c.post("/api/preorder", json=ONE, headers=ME)
            assert time.monotonic() - started < 2, "the statement timeout bounds a stuck write"
        assert_retryable_problem(r)
        await assert_nothing_held(redis)
    await assert_invariants(db, redis)


async def test_write_fenced_out_by_a_concurrent_rebuild_answers_503_and_leaks_nothing(app, client, db, redis):
    """The reservation was made against Redis figures a loader then replaced: its write must not land."""
    await make_product(client, total_stock=5)
    loader_locked, go_on = asyncio.Event(), asyncio.Event()

    async def slow_loader_step(_: object) -> None:  # runs inside the loader's FOR UPDATE transaction
        loader_locked.set()
        await go_on.wait()

    rebuild = asyncio.create_task(app.state.stock.rebuild("P1001", apply=slow_loader_step))
    await loader_locked.wait()
    create = asyncio.create_task(client.post("/api/preorder", json=ONE, headers=ME))
    await eventually(lambda: _holds_at_least(redis, 1), within=5)  # reserved, now waiting on the lock
    go_on.set()
    await rebuild
    assert_retryable_problem(await create)
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    await assert_nothing_held(redis)
    assert (await client.post("/api/preorder", json=ONE, headers=ME)).status_code == 201
    await assert_invariants(db, redis)


async def test_a_loader_finishing_last_with_an_older_snapshot_does_not_stay_in_redis(app, client, db, redis):
    """Two processes rebuild at once; the newer snapshot lands first, Redis loses its data, then the older one
    lands on the empty Redis. Left there, it would lack the orders written since and fence out every write."""
    await make_product(client, total_stock=10)
    pool = await dbmod.create_pool(app.state.settings)
    try:
        slow = Stock(redis, pool)  # another process's loader, delayed between its commit and its load
        committed, go_on = asyncio.Event(), asyncio.Event()
        real_load = slow._load

        async def late_load(**kw: object) -> object:
            committed.set()
            await go_on.wait()
            return await real_load(**kw)

        slow._load = late_load  # type: ignore[assignment]
        older = asyncio.create_task(slow.rebuild("P1001"))
        await committed.wait()
        await app.state.stock.rebuild("P1001")  # the newer snapshot lands first
        first = await client.post("/api/preorder", json=ONE, headers=ME)
        assert first.status_code == 201
        await redis.flushdb()
        go_on.set()
        await older
    finally:
        await pool.close()
    second = await client.post("/api/preorder", json=ONE, headers=ME)
    assert second.status_code == 201, second.text
    await assert_invariants(db, redis, created=[first.json()["order_id"], second.json()["order_id"]])


async def test_a_rebuild_whose_load_never_landed_is_healed_by_the_reconciler(app, client, db, redis):
    """A loader committed its new epoch and died (or lost Redis) before loading: Redis keeps the old epoch, so
    the fence refuses every write. The reconciler's round notices the old epoch and rebuilds."""
    await make_product(client, total_stock=10)
    await db.execute("UPDATE products SET stock_epoch = stock_epoch + 1 WHERE id = 'P1001'")  # what it left
    assert_retryable_problem(await client.post("/api/preorder", json=ONE, headers=ME))
    assert (await settle_all(app.state.stock, orphan_hold_s=60)).rebuilt == 1
    r = await client.post("/api/preorder", json=ONE, headers=ME)
    assert r.status_code == 201, r.text
    await assert_invariants(db, redis, created=[r.json()["order_id"]])


async def _holds_at_least(redis: RedisClient, n: int, product_id: str = "P1001") -> None:
    assert await redis.hlen(product_keys(product_id).holds) >= n




# ---- real processes ---------------------------------------------------------------------------------------

async def settled(db: asyncpg.Connection, redis: RedisClient, traffic: Traffic) -> None:
    """I1 and I3 at once; I2 once the running app's reconciler has settled the holds left behind."""
    await assert_invariants(db, redis, created=traffic.created, settled=False)
    await eventually(lambda: assert_invariants(db, redis, created=traffic.created), within=SETTLE_S, interval=0.2)


@contextlib.asynccontextmanager
async def ordering_hot(server: Server, *, total_stock: int, workers: int
                       ) -> AsyncIterator[tuple[httpx.AsyncClient, Traffic]]:
    """The server started, a product HOT, and `workers` customers ordering it without pause until the block
    ends (the load is stopped and awaited on the way out)."""
    await server.start()
    traffic, stop = Traffic(), asyncio.Event()
    async with server.client() as c:
        await new_product(c, "HOT", total_stock=total_stock)
        load = asyncio.create_task(steady(c, traffic, stop, product_id="HOT", workers=workers))
        try:
            yield c, traffic
        finally:
            stop.set()
            await load


@contextlib.asynccontextmanager
async def burst_with_faults(server: Server, fault: Callable[[], Awaitable[object]], *, at: tuple[int, ...]
                            ) -> AsyncIterator[tuple[httpx.AsyncClient, Traffic]]:
    """500 creates at once on a product HOT of 300 units, `fault()` injected as the answers reach each count
    in `at`; the block runs once every answer is in."""
    await server.start()
    traffic = Traffic()
    async with server.client() as c:
        await new_product(c, "HOT", total_stock=300)
        load = asyncio.create_task(burst(c, traffic, product_id="HOT", count=500))
        for count in at:
            await traffic.reached(count)
            await fault()
        await load
        yield c, traffic


@pytest.mark.faults
async def test_flushall_in_the_middle_of_500_creates(db, own_redis, own_redis_client, servers_for):
    flushall = own_redis_client.flushall
    async with burst_with_faults(servers_for(own_redis.url), flushall, at=(100, 200, 300)) as (c, traffic):
        traffic.assert_only({201, 409, 503})
        traffic.assert_503s_are_problems()
        assert sum(traffic.created.values()) <= 300
        await settled(db, own_redis_client, traffic)
        r = (await c.get("/api/products/HOT")).json()
        assert r["reserved"] == await _pg_reserved(db, "HOT"), "the rebuilt counters are PostgreSQL's"


@pytest.mark.faults
async def test_script_flush_in_the_middle_of_500_creates(db, own_redis, own_redis_client, servers_for):
    script_flush = own_redis_client.script_flush
    async with burst_with_faults(servers_for(own_redis.url), script_flush, at=(100, 250)) as (_, traffic):
        traffic.assert_only({201, 409})  # NOSCRIPT is answered by loading the script again: nobody notices
        assert traffic.statuses()[201] == 300, "sold out exactly"
        await settled(db, own_redis_client, traffic)


@pytest.mark.faults
@pytest.mark.skipif(ON_CLUSTER, reason="one server restarted empty; tests/test_cluster.py kills a primary")
async def test_redis_restarted_empty_in_the_middle_of_load(db, own_redis, own_redis_client, servers_for):
    async with ordering_hot(servers_for(own_redis.url), total_stock=400, workers=20) as (_, traffic):
        await traffic.reached(150)
        own_redis.kill()
        await _answers_after(traffic, 40)  # the outage is seen by clients
        own_redis.start()  # same port, no data
        restarted = len(traffic.answers)
        await asyncio.wait_for(_sold_out(traffic, after=restarted), timeout=60)
    traffic.assert_only({201, 409, 503})
    traffic.assert_503s_are_problems()
    assert traffic.statuses()[503] > 0, "the restart was noticed"
    assert any(a.status == 201 for a in traffic.answers[restarted:]), "it recovered after the restart"
    await settled(db, own_redis_client, traffic)


@pytest.mark.faults
async def test_kill_9_mid_load_then_restart_releases_orphan_holds(db, own_redis, own_redis_client, servers_for):
    server = servers_for(own_redis.url)
    async with ordering_hot(server, total_stock=1000, workers=20) as (_, traffic):
        await traffic.reached(100)
        # Hold the product row so in-flight creates have reserved in Redis but not written yet: the kill
        # then surely leaves holds without orders behind (the window the reconciler exists for).
        async with db.transaction():
            await db.execute("SELECT 1 FROM products WHERE id = 'HOT' FOR UPDATE")
            await eventually(lambda: _unwritten_holds_at_least(db, own_redis_client, 5), within=10)
            server.kill()
            at_kill = await _unwritten_holds(db, own_redis_client)
            # The dead app's statements time out server-side; only then may the row go, so none of them lands.
            await eventually(lambda: _no_lock_waiters(db), within=10)
    orphans = at_kill - set(traffic.created)
    orphans -= {str(r["id"]) for r in await db.fetch("SELECT id FROM orders WHERE id = ANY($1::uuid[])", orphans)}
    assert len(orphans) >= 5, "the kill left orphan holds"
    assert {a.status for a in traffic.answers} <= {0, 201, 409, 503}
    await server.start()  # the same port, a new process
    traffic2, stop2 = Traffic(), asyncio.Event()
    async with server.client() as c:
        load = asyncio.create_task(steady(c, traffic2, stop2, product_id="HOT", workers=10))
        await traffic2.reached(100)
        stop2.set()
        await load
    traffic2.assert_only({201})
    traffic.created.update(traffic2.created)
    await settled(db, own_redis_client, traffic)
    left = await own_redis_client.hmget(product_keys("HOT").holds, sorted(orphans))
    assert left == [None] * len(orphans), "the restarted process's reconciler released every orphan hold"


async def _unwritten_holds(db: asyncpg.Connection, redis: RedisClient) -> set[str]:
    held = {k.decode() for k in await redis.hkeys(product_keys("HOT").holds)}
    written = {str(r["id"]) for r in await db.fetch("SELECT id FROM orders WHERE id = ANY($1::uuid[])", held)}
    return held - written


async def _unwritten_holds_at_least(db: asyncpg.Connection, redis: RedisClient, n: int) -> None:
    assert len(await _unwritten_holds(db, redis)) >= n


async def _no_lock_waiters(db: asyncpg.Connection) -> None:
    waiting = await db.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted")
    assert waiting == 0, f"{waiting} statements still wait for the product row"


@pytest.mark.faults
@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_postgresql_unreachable_under_load_answers_503_then_recovers(
    settings, db, own_redis, own_redis_client, servers_for, mode
):
    proxy = PgProxy(settings.database_url)
    await proxy.start()
    server = servers_for(own_redis.url, proxy.url)
    try:
        async with ordering_hot(server, total_stock=100_000, workers=60) as (c, traffic):
            await traffic.reached(100)
            proxy.cut(mode)
            cut_at, cut_index = time.monotonic(), len(traffic.answers)
            await eventually(lambda: _ready(c, postgresql_ok=False), within=10)
            await _answers_after(traffic, 40)
            await asyncio.sleep(max(0.0, 3 - (time.monotonic() - cut_at)))  # the outage lasts 3 seconds
            proxy.restore()
            back_index = len(traffic.answers)
            await eventually(lambda: _ready(c, postgresql_ok=True), within=10)
            await eventually(lambda: _created_after(traffic, back_index, 50), within=20)
        traffic.assert_only({201, 503})
        traffic.assert_503s_are_problems()
        during = traffic.answers[cut_index:back_index]
        assert any(a.status == 503 for a in during), "the outage was answered with 503"
        slowest = max(a.seconds for a in traffic.answers)
        assert slowest < 8, f"a request hung {slowest:.1f}s: every wait on PostgreSQL must be bounded"
        await settled(db, own_redis_client, traffic)
    finally:
        await proxy.close()


async def _ready(c: httpx.AsyncClient, *, postgresql_ok: bool) -> None:
    r = await c.get("/readyz", timeout=10)
    body = r.json()
    if postgresql_ok:
        assert r.status_code == 200 and body["postgresql"] == "ok", body
    else:
        assert r.status_code == 503 and body["postgresql"].startswith("down"), body
        assert body["redis"] == "ok"


@contextlib.asynccontextmanager
async def two_processes(servers_for: Callable[..., Server], redis_url: str, layout: str, **env: str
                        ) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two app processes on one Redis and one PostgreSQL, started, and a client for each half of the load:
    'serves' is two `preorder serve` (each client has its own), 'workers' is one `preorder serve --workers 2`
    (both clients reach its one port, and the kernel hands each connection to one of the two workers)."""
    if layout == "workers":
        a = b = servers_for(redis_url, workers=2, **env)
        await a.start()
    else:
        a, b = servers_for(redis_url, **env), servers_for(redis_url, **env)
        await asyncio.gather(a.start(), b.start())
    async with a.client() as ca, b.client() as cb:
        yield ca, cb


TWO_PROCESSES = pytest.mark.parametrize("layout", ["serves", "workers"])


@pytest.mark.faults
@TWO_PROCESSES
async def test_two_processes_on_one_hot_product_never_oversell(db, own_redis, own_redis_client, servers_for, layout):
    slow_safe = {"PREORDER_DB_STATEMENT_TIMEOUT_MS": "3000", "PREORDER_WRITE_DEADLINE_S": "20",
                 "PREORDER_ORPHAN_HOLD_S": "60"}
    traffic = Traffic()
    async with two_processes(servers_for, own_redis.url, layout, **slow_safe) as (ca, cb):
        await new_product(ca, "HOT", total_stock=200)
        done = asyncio.Event()
        watch = asyncio.create_task(_watch_never_over(db, "HOT", 200, done))
        try:
            await asyncio.gather(burst(ca, traffic, product_id="HOT", count=250, concurrency=50),
                                 burst(cb, traffic, product_id="HOT", count=250, concurrency=50))
        finally:
            done.set()
            samples = await watch
    assert samples > 10, "I1 was sampled while the load ran"
    traffic.assert_only({201, 409})
    assert traffic.statuses()[201] == 200, "sold out exactly: never over, nothing lost"
    assert await _pg_reserved(db, "HOT") == 200
    await assert_invariants(db, own_redis_client, created=traffic.created)


@pytest.mark.faults
@TWO_PROCESSES
async def test_two_processes_rebuilding_after_flushall_stay_exact(db, own_redis, own_redis_client, servers_for,
                                                                  layout):
    traffic = Traffic()
    async with two_processes(servers_for, own_redis.url, layout) as (ca, cb):
        await new_product(ca, "HOT", total_stock=300)
        load = asyncio.gather(burst(ca, traffic, product_id="HOT", count=250, concurrency=50),
                              burst(cb, traffic, product_id="HOT", count=250, concurrency=50))
        for at in (80, 160, 240):
            await traffic.reached(at)
            await own_redis_client.flushall()
        await load
    traffic.assert_only({201, 409, 503})
    traffic.assert_503s_are_problems()
    await settled(db, own_redis_client, traffic)


@pytest.mark.faults
@TWO_PROCESSES
async def test_one_idempotency_key_sent_to_two_processes_at_once_makes_one_order(
    db, own_redis, own_redis_client, servers_for, layout
):
    body, headers = {"product_id": "HOT", "quantity": 2}, {**USERS[0], "Idempotency-Key": "k-both"}
    async with two_processes(servers_for, own_redis.url, layout) as (ca, cb):
        await new_product(ca, "HOT", total_stock=10)
        answers = await asyncio.gather(*(c.post("/api/preorder", json=body, headers=headers)
                                         for c in (ca, cb) for _ in range(10)))
        late = await cb.post("/api/preorder", json=body, headers=headers)
    assert {r.status_code for r in answers} <= {201, 409}, [r.text for r in answers]
    made = [r.json()["order_id"] for r in answers if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(made) == 1, "one request made the order; the others replayed it or were told it is in progress"
    assert late.status_code == 201 and late.json()["order_id"] == made[0]
    assert await db.fetchval("SELECT count(*) FROM orders") == 1
    await assert_invariants(db, own_redis_client, created={made[0]: 2})


async def _watch_never_over(db: asyncpg.Connection, product_id: str, total: int, done: asyncio.Event) -> int:
    samples = 0
    while not done.is_set():  # I1 sampled while the load runs, not only at the end
        assert await _pg_reserved(db, product_id) <= total
        samples += 1
        await asyncio.sleep(0.02)
    return samples


async def _pg_reserved(db: asyncpg.Connection, product_id: str) -> int:
    return int(await db.fetchval(
        "SELECT COALESCE(sum(quantity), 0) FROM orders WHERE product_id = $1 AND status <> 'cancelled'", product_id
    ))


async def _answers_after(traffic: Traffic, n: int) -> None:
    await asyncio.wait_for(traffic.reached(len(traffic.answers) + n), timeout=30)


async def _created_after(traffic: Traffic, index: int, n: int) -> None:
    assert sum(1 for a in traffic.answers[index:] if a.status == 201) >= n


async def _sold_out(traffic: Traffic, *, after: int) -> None:
    while not any(a.status == 409 for a in traffic.answers[after:]):
        await traffic.reached(len(traffic.answers) + 1)
