"""What an operator sees, in process: the metrics /metrics exports after real traffic, request ids in answers and
problem bodies, no internals in a 503, and Redis steps after a commit that fail without failing the request."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import asyncpg
import httpx
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from preorder import db as dbmod
from preorder.app import create_app
from preorder.settings import Settings
from preorder.stock.keys import product_keys
from preorder.stock.service import Stock
from preorder.workers.reconciler import settle_all
from tests.conftest import asgi_client, bearer, make_product, make_settings, serving
from tests.harness import PgProxy, eventually
from tests.invariants import assert_invariants

ME = bearer("U-obs")
ONE = {"product_id": "P1001", "quantity": 1}


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_requests_by_route_template_and_refusals_by_reason(client):
    await make_product(client, total_stock=2)
    before = await scrape(client)
    created = [await client.post("/api/preorder", json=ONE, headers=ME) for _ in range(2)]
    assert [r.status_code for r in created] == [201, 201]
    refused = [await client.post("/api/preorder", json=ONE, headers=ME) for _ in range(2)]
    assert [r.status_code for r in refused] == [409, 409]
    assert (await client.get(f"/api/preorder/{created[0].json()['order_id']}", headers=ME)).status_code == 200
    assert (await client.get("/no/such/path")).status_code == 404
    assert (await client.get("/openapi.json")).status_code == 200
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    red = "http_server_request_duration_seconds_count"
    assert delta(red, method="POST", route="/api/preorder", status_class="2xx") == 2
    assert delta(red, method="POST", route="/api/preorder", status_class="4xx") == 2
    assert delta(red, method="GET", route="/api/preorder/{order_id}", status_class="2xx") == 1
    assert delta(red, method="GET", route="unmatched", status_class="4xx") == 1, "raw paths never become labels"
    assert delta(red, method="GET", route="/openapi.json", status_class="2xx") == 1, "a plain route has its template"
    assert delta(red, method="GET", route="unmatched", status_class="2xx") == 0
    assert delta("preorder_orders_created_total") == 2
    assert delta("preorder_order_create_refusals_total", reason="out_of_stock") == 1, "Redis said 0 left"
    assert delta("preorder_order_create_refusals_total", reason="sold_out_mark") == 1, "then memory said it"
    assert delta("preorder_reserve_script_asks_count") == 3
    assert delta("preorder_order_commit_batch_size_sum") == 2
    assert value(after, "preorder_stock_total_units", product_id="P1001") == 2
    assert value(after, "preorder_stock_reserved_units", product_id="P1001") == 2
    assert value(after, "preorder_stock_available_units", product_id="P1001") == 0
    assert value(after, "http_server_active_requests") == 1, "the scrape itself is in flight"


async def test_status_changes_are_counted_from_and_to(client):
    await make_product(client)
    order = (await client.post("/api/preorder", json=ONE, headers=ME)).json()
    before = await scrape(client)
    assert (await client.delete(f"/api/preorder/{order['order_id']}", headers=ME)).status_code == 200
    after = await scrape(client)
    labels = {"from_status": "pending", "to_status": "cancelled"}
    assert (value(after, "preorder_order_status_changes_total", **labels)
            - value(before, "preorder_order_status_changes_total", **labels)) == 1


async def test_stock_gauges_cover_only_products_in_a_live_presale(client):
    await make_product(client, "OPEN")
    await make_product(client, "LATER", starts_at="2999-01-01T00:00:00Z")
    samples = await scrape(client)
    assert value(samples, "preorder_stock_total_units", product_id="OPEN") == 100
    assert ("preorder_stock_total_units", frozenset({("product_id", "LATER")})) not in samples


async def test_request_id_is_echoed_and_names_the_problem_instance(client):
    r = await client.get("/api/preorder/00000000-0000-7000-8000-000000000000", headers={**ME, "X-Request-ID": "abc-1"})
    assert r.status_code == 404
    assert r.headers["x-request-id"] == "abc-1"
    assert r.json()["instance"] == "urn:request:abc-1"
    generated = await client.get("/api/products/NOPE", headers={"X-Request-ID": "not a token\u00e9".encode()})
    assert generated.headers["x-request-id"] not in ("", "not a token")
    assert generated.json()["instance"] == f"urn:request:{generated.headers['x-request-id']}"
    hot = await client.post("/api/preorder", json=ONE, headers={**ME, "X-Request-ID": "hot-1"})
    assert hot.status_code == 404 and hot.json()["instance"] == "urn:request:hot-1", "the hot route's own refusals"


@contextlib.asynccontextmanager
async def through(url: str) -> AsyncIterator[PgProxy]:
    """A TCP proxy in front of PostgreSQL or Redis (PgProxy forwards any TCP service named by a URL)."""
    proxy = PgProxy(url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_an_outage_answer_tells_the_client_no_internals(settings, db, redis):
    async with through(settings.database_url) as proxy, serving(make_settings(proxy.url, settings.redis_url)) as c:
        await make_product(c)
        proxy.cut("reset")
        for r in (await c.get("/api/products/P1001"), await c.post("/api/preorder", json=ONE, headers=ME)):
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            body = r.text
            assert str(proxy.port) not in body and "127.0.0.1" not in body and "Error" not in body, body


async def test_a_redis_failure_after_a_committed_cancel_still_answers_200(settings, db, redis):
    async with (through(settings.redis_url) as proxy, pg_pool(settings) as pool,
                serving(make_settings(settings.database_url, proxy.url, redis_timeout_s=0.5)) as c):
        await make_product(c, total_stock=5)
        order = (await c.post("/api/preorder", json=ONE, headers=ME)).json()
        before = await scrape(c)
        proxy.cut("reset")
        r = await c.delete(f"/api/preorder/{order['order_id']}", headers=ME)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        proxy.restore()
        failed = value(await scrape(c), "preorder_redis_side_effect_failures_total", step="release")
        assert failed - value(before, "preorder_redis_side_effect_failures_total", step="release") == 1
        assert await redis.hlen(product_keys("P1001").holds) == 1, "the hold is still there: left to the reconciler"
        assert (await settle_all(Stock(redis, pool), orphan_hold_s=60)).released == 1
    await assert_invariants(db, redis)


async def test_a_redis_failure_after_an_idempotent_create_committed_still_answers_201(settings, db, redis):
    """The marker's delete comes after the order row committed: Redis failing then must not turn it into a 503."""
    async with (through(settings.redis_url) as proxy,
                serving(make_settings(settings.database_url, proxy.url, redis_timeout_s=0.5)) as c):
        await make_product(c, total_stock=5)
        async with slow_order_inserts(db):
            create = asyncio.create_task(c.post("/api/preorder", json=ONE, headers={**ME, "Idempotency-Key": "k-1"}))
            await eventually(lambda: _holds(redis, 1), within=5)  # reserved; the insert is sleeping
            proxy.cut("reset")
            r = await create
        assert r.status_code == 201, r.text
        proxy.restore()
        again = await c.post("/api/preorder", json=ONE, headers={**ME, "Idempotency-Key": "k-1"})
        assert again.status_code == 201 and again.json()["order_id"] == r.json()["order_id"]
    await assert_invariants(db, redis, created=[r.json()["order_id"]])


@contextlib.asynccontextmanager
async def pg_pool(settings: Settings) -> AsyncIterator[dbmod.PgPool]:
    pool = await dbmod.create_pool(settings)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def slow_order_inserts(db: asyncpg.Connection) -> AsyncIterator[None]:
    await db.execute("CREATE FUNCTION slow_orders() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END$$")
    await db.execute("CREATE TRIGGER slow_orders BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION slow_orders()")
    try:
        yield
    finally:
        await db.execute("DROP TRIGGER slow_orders ON orders; DROP FUNCTION slow_orders()")


async def _holds(redis: aioredis.Redis, n: int) -> None:
    assert await redis.hlen(product_keys("P1001").holds) >= n


async def test_products_list_is_public_and_counted(client):
    """/metrics itself and the public reads are measured too (the scrape is a GET like any other)."""
    await make_product(client)
    before = await scrape(client)
    assert (await client.get("/api/products")).status_code == 200
    after = await scrape(client)
    name = "http_server_request_duration_seconds_count"
    labels = {"method": "GET", "route": "/api/products", "status_class": "2xx"}
    assert value(after, name, **labels) - value(before, name, **labels) == 1


async def test_an_unexpected_error_is_a_500_problem_with_the_request_id_and_logged_with_its_exception(
    settings, db, redis, capsys
):
    app = create_app(settings)

    async def broken() -> None:
        raise RuntimeError("secret internals at 10.0.0.7:5432")

    app.add_api_route("/broken", broken)  # a real route that fails the way a bug would
    async with app.router.lifespan_context(app), asgi_client(app) as c:
        r = await c.get("/broken", headers={"X-Request-ID": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json()["instance"] == "urn:request:bug-1" and "10.0.0.7" not in r.text
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    errors = [x for x in logged if x.get("request_id") == "bug-1" and x.get("level") == "error"]
    assert errors and "RuntimeError: secret internals" in errors[0]["exception"]


async def test_metrics_off_records_nothing_and_on_again_records(settings, db, redis):
    """PREORDER_METRICS=false (for measuring what recording costs): the same traffic changes no metric."""
    off = Settings(**{**settings.model_dump(), "metrics": False})
    async with serving(off) as client:
        await make_product(client, total_stock=5)
        before = await scrape(client)
        assert (await client.post("/api/preorder", json=ONE, headers=ME)).status_code == 201
        assert (await client.post("/api/preorder", json={**ONE, "product_id": "NOPE"}, headers=ME)).status_code == 404
        after = await scrape(client)
    changed = {key for key in after if after[key] != before.get(key, 0.0) and key[0].startswith(("preorder_", "http_"))}
    assert not {k for k in changed if not k[0].startswith("preorder_stock_")}, changed  # stock gauges are read live
    async with serving(settings) as client:  # a service with metrics on records again
        before = await scrape(client)
        assert (await client.post("/api/preorder", json=ONE, headers=bearer("U-obs-2"))).status_code == 201
        after = await scrape(client)
    assert value(after, "preorder_orders_created_total") - value(before, "preorder_orders_created_total") == 1
