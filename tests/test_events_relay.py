"""The relay, in process, against a real NATS JetStream and a real webhook receiver: delivery, signatures,
order per order, retries with backoff, give-up, disabling, pause, manual retry, lag."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from preorder.db import asyncpg_dsn
from preorder.events import repository as events_repo
from preorder.events.relay import Relay
from preorder.ids import new_id
from preorder.orders import repository as orders_repo
from preorder.settings import Settings
from tests.conftest import ADMIN, bearer, make_product, make_settings, served, serving
from tests.events_peers import Receiver, endpoint, purge_stream, receiving, stream_events
from tests.harness import eventually
from tests.invariants import assert_events_delivered

FAST = {
    "relay_enabled": True, "relay_interval_s": 0.05, "relay_backoff_base_s": 0.1, "webhook_backoff_max_s": 0.4,
    "webhook_timeout_s": 1.0, "relay_lease_s": 3.0, "relay_burst_events_per_s": 0,  # the burst tests turn it on
}


@pytest.fixture
async def receiver(redis: aioredis.Redis) -> AsyncIterator[Receiver]:
    """A fresh receiver, and Redis emptied (the products of an earlier test are gone from PostgreSQL)."""
    async with receiving(hang_s=2.5) as r:
        yield r


def relay_settings(settings: Settings, **overrides: Any) -> Settings:
    return make_settings(settings.database_url, settings.redis_url, **{**FAST, **overrides})


async def orders_with_history(client: httpx.AsyncClient, count: int, *, batch: str = "") -> list[str]:
    """`count` orders; every other one paid, every third cancelled: 1 to 5 events each (created; the payment and
    paid; cancelled and the refund of what was paid)."""
    ids = []
    for i in range(count):
        user = bearer(f"U{i}")
        r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=user)
        assert r.status_code == 201, r.text
        order = r.json()
        ids.append(order["order_id"])
        if i % 2 == 0:
            pay = {"status": "paid", "payment": {"reference": f"PAY-{batch}{i}", "amount": order["amount_due"]}}
            assert (await client.put(f"/api/preorder/{order['order_id']}", json=pay, headers=user)).status_code == 200
        if i % 3 == 0:
            assert (await client.delete(f"/api/preorder/{order['order_id']}", headers=user)).status_code == 200
    return ids


async def deliveries(client: httpx.AsyncClient, endpoint_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/api/webhooks/{endpoint_id}/deliveries", headers=ADMIN)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def test_every_event_reaches_nats_and_every_endpoint_signed_and_in_order(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver, nats_url: str
) -> None:
    await purge_stream(nats_url)
    async with serving(relay_settings(settings, nats_url=nats_url)) as client:
        await make_product(client)
        everything = await endpoint(client, receiver, "all")
        await endpoint(client, receiver, "paid", event_types=["preorder.order.paid"])
        await orders_with_history(client, 12)

        async def delivered() -> None:
            await assert_events_delivered(db, {"nats": await stream_events(nats_url), "all": receiver.events("all")})

        await eventually(delivered, within=30)
        assert {e["type"] for e in receiver.events("paid")} == {"preorder.order.paid"}
        assert len(receiver.events("paid")) == 6
        assert not receiver.forged
        sent = await deliveries(client, everything["id"])
        assert {d["status"] for d in sent} == {"delivered"} and {d["response_code"] for d in sent} == {204}
        assert all(d["latency_ms"] is not None and d["next_attempt_at"] is None for d in sent)
        headers = receiver.received["all"][0].headers
        assert headers["webhook-id"] == receiver.events("all")[0]["id"]
        assert headers["content-type"] == "application/cloudevents+json"


async def test_a_failing_endpoint_is_retried_while_later_events_of_the_order_wait(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.mode = "fail"
    async with serving(relay_settings(settings)) as client:
        await make_product(client)
        hook = await endpoint(client, receiver, "h")
        await orders_with_history(client, 1)  # created, payment, paid, cancelled, refund

        async def retried() -> list[dict[str, Any]]:
            got = await deliveries(client, hook["id"])
            first = [d for d in got if d["sequence"] == 1]
            assert first and first[0]["attempts"] >= 3, got
            return got

        got = await eventually(retried, within=20)
        first = next(d for d in got if d["sequence"] == 1)
        assert first["status"] == "pending" and first["response_code"] == 500 and first["next_attempt_at"]
        assert all(d["attempts"] == 0 for d in got if d["sequence"] > 1)  # waiting behind the first
        receiver.mode = "ok"

        async def delivered() -> None:
            await assert_events_delivered(db, {"h": receiver.events("h")})

        await eventually(delivered, within=20)
        assert [e["sequence"] for e in receiver.events("h")] == [1, 2, 3, 4, 5]


async def test_a_receiver_that_hangs_is_timed_out_and_retried(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.mode = "hang"
    async with serving(relay_settings(settings)) as client:
        await make_product(client)
        hook = await endpoint(client, receiver, "h")
        await orders_with_history(client, 1)

        async def timed_out() -> None:
            got = await deliveries(client, hook["id"])
            assert any("Timeout" in (d["last_error"] or "") for d in got), got

        await eventually(timed_out, within=20)
        receiver.mode = "ok"
        await eventually(lambda: assert_events_delivered(db, {"h": receiver.events("h")}), within=20)


async def test_a_delivery_past_its_retry_period_fails_and_an_admin_can_send_it_again(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.mode = "fail"
    async with serving(relay_settings(settings, webhook_retry_for_s=0.5)) as client:
        await make_product(client)
        hook = await endpoint(client, receiver, "h")
        r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=bearer("U1"))
        assert r.status_code == 201

        async def failed() -> dict[str, Any]:
            got = await deliveries(client, hook["id"])
            assert got and got[0]["status"] == "failed", got
            return got[0]

        delivery = await eventually(failed, within=20)
        receiver.mode = "ok"
        url = f"/api/webhooks/{hook['id']}/deliveries/{delivery['id']}/retry"
        again = await client.post(url, headers=ADMIN)
        assert again.status_code == 202 and again.json()["status"] == "pending"
        await eventually(lambda: assert_events_delivered(db, {"h": receiver.events("h")}), within=20)
        unknown = await client.post(f"/api/webhooks/{hook['id']}/deliveries/999999/retry", headers=ADMIN)
        assert unknown.status_code == 404


async def test_an_endpoint_failing_past_the_bound_is_disabled_until_resumed(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.mode = "fail"
    async with serving(relay_settings(settings, webhook_disable_after_s=0.5)) as client:
        await make_product(client)
        hook = await endpoint(client, receiver, "h")
        await orders_with_history(client, 1)

        async def disabled() -> None:
            got = (await client.get(f"/api/webhooks/{hook['id']}", headers=ADMIN)).json()
            assert got["status"] == "disabled" and got["failing_since"], got

        await eventually(disabled, within=20)
        receiver.mode = "ok"
        resumed = await client.patch(f"/api/webhooks/{hook['id']}", json={"status": "active"}, headers=ADMIN)
        assert resumed.json()["status"] == "active" and resumed.json()["failing_since"] is None
        await eventually(lambda: assert_events_delivered(db, {"h": receiver.events("h")}), within=20)


async def test_a_paused_endpoint_queues_its_events_until_resumed(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async with serving(relay_settings(settings)) as client:
        await make_product(client)
        hook = await endpoint(client, receiver, "h")
        await client.patch(f"/api/webhooks/{hook['id']}", json={"status": "paused"}, headers=ADMIN)
        await orders_with_history(client, 2)

        async def queued() -> None:
            got = await deliveries(client, hook["id"])
            assert len(got) == 6 and {d["status"] for d in got} == {"pending"}, got

        await eventually(queued, within=20)
        assert receiver.attempts == 0
        await client.patch(f"/api/webhooks/{hook['id']}", json={"status": "active"}, headers=ADMIN)
        await eventually(lambda: assert_events_delivered(db, {"h": receiver.events("h")}), within=20)


async def test_lag_is_a_metric_and_readyz_says_degraded_past_the_bound(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.mode = "fail"
    async with serving(relay_settings(settings, events_lag_degraded_s=0.5)) as client:
        await make_product(client)
        await endpoint(client, receiver, "h")
        assert (await client.get("/readyz")).json()["events"] == "ok"
        await orders_with_history(client, 1)

        async def degraded() -> None:
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.json()
            metrics = (await client.get("/metrics")).text
            lag = next(line for line in metrics.splitlines() if line.startswith("preorder_events_relay_lag_seconds"))
            assert float(lag.split()[-1]) > 0.5

        await eventually(degraded, within=20)
        receiver.mode = "ok"

        async def caught_up() -> None:
            assert (await client.get("/readyz")).json()["events"] == "ok"

        await eventually(caught_up, within=20)


async def test_the_lag_is_read_in_index_order_even_from_an_empty_outbox(db: asyncpg.Connection) -> None:
    """The lag's statement keeps its first plan on a connection. Planned on an empty outbox without the settings
    lag_seconds uses, PostgreSQL read the whole table and sorted it, and went on doing so as the outbox grew
    (15-70 ms a look in the benchmark, each second, stalling the creates in flight)."""
    async with db.transaction():
        await db.execute(events_repo.INDEX_ORDER_ONLY)
        plan = "\n".join(row[0] for row in await db.fetch(f"EXPLAIN {events_repo.LAG}"))
    assert "Index Scan using order_events_fanout_idx on order_events" in plan, plan
    assert "Seq Scan on order_events" not in plan and "Sort" not in plan, plan


async def test_finished_deliveries_are_purged_after_the_retention_but_the_history_stays(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async with serving(relay_settings(settings, events_retention_s=0.5)) as client:
        await make_product(client)
        await endpoint(client, receiver, "h")
        await orders_with_history(client, 2)
        await eventually(lambda: assert_events_delivered(db, {"h": receiver.events("h")}), within=20)

        async def purged() -> None:
            assert await db.fetchval("SELECT count(*) FROM event_deliveries") == 0

        await eventually(purged, within=20)
        assert await db.fetchval("SELECT count(*) FROM order_events") == 6


async def test_two_relays_deliver_each_event_once_in_order(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    relay = relay_settings(settings)
    async with serving(relay) as client, serving(relay):
        await make_product(client)
        await endpoint(client, receiver, "h")
        await asyncio.gather(*(orders_with_history(client, 6, batch=f"B{b}-") for b in range(3)))
        await eventually(lambda: assert_events_delivered(db, {"h": receiver.events("h")}), within=30)
        ids = [e["id"] for e in receiver.events("h")]
        assert len(ids) == len(set(ids))


async def test_an_event_that_cannot_be_built_waits_alone_and_says_why(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async with serving(relay_settings(settings, relay_enabled=False)) as client:  # written, not yet relayed
        await make_product(client)
        hook = await endpoint(client, receiver, "h")
        broken, fine = await orders_with_history(client, 2, batch="P")
    await db.execute("""UPDATE order_events SET data = '{"id": "not an order"}' WHERE order_id = $1""",
                     uuid.UUID(broken))
    async with serving(relay_settings(settings)) as client:

        async def others_delivered() -> None:
            got = {e["subject"] for e in receiver.events("h")}
            assert got == {fine}, got
            stuck = [d for d in await deliveries(client, hook["id"]) if d["order_id"] == broken]
            assert any("can't build" in (d["last_error"] or "") for d in stuck), stuck

        await eventually(others_delivered, within=20)


async def test_an_event_written_earlier_but_committed_later_is_not_passed_by_the_fan_out(
    client: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    """The fan-out reads the outbox through one cursor (migration 0009). An event row written in a transaction still
    open, behind which another transaction's event commits, must not fall behind the cursor: both go out once the
    first commits, none before."""
    for pid in ("P1001", "P1002"):  # two products: the open transaction holds its product's row
        await make_product(client, pid)
    sink = await db.fetchval("INSERT INTO event_sinks (id, kind, url, secret) VALUES "
                             "(gen_random_uuid(), 'webhook', 'http://127.0.0.1:9/h', 'whsec_x') RETURNING id")
    while await events_repo.fan_out(db, limit=1000, retry_for_s=60):  # whatever the set-up wrote
        pass
    early, late = [await asyncpg.connect(asyncpg_dsn(settings.database_url)) for _ in range(2)]
    try:
        async with early.transaction():
            first = await orders_repo.insert_many(early, await _new_orders(db, "P1001"))  # the smaller event id
            second = await orders_repo.insert_many(late, await _new_orders(db, "P1002"))  # committed at once
            assert await events_repo.fan_out(db, limit=1000, retry_for_s=60) == 0, "passed an uncommitted event"
        assert await events_repo.fan_out(db, limit=1000, retry_for_s=60) == 2
    finally:
        await early.close()
        await late.close()
    queued = await db.fetch("SELECT order_id FROM event_deliveries WHERE sink_id = $1", sink)
    assert {r["order_id"] for r in queued} == {*first, *second}


async def _new_orders(db: asyncpg.Connection, pid: str, n: int = 1) -> list[orders_repo.NewOrder]:
    epoch = await db.fetchval("SELECT stock_epoch FROM products WHERE id = $1", pid)
    now = datetime.now(UTC)
    return [orders_repo.NewOrder(order_id=new_id(), product_id=pid, user_id="U1", quantity=1, epoch=epoch,
                                 deadline=now + timedelta(seconds=30), now=now) for _ in range(n)]


async def test_deliveries_waiting_behind_a_failing_one_do_not_hold_up_the_line(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A claim reads each sink's due deliveries in order up to its batch (migration 0009). Deliveries that wait for
    an earlier event of their order must not fill that window: 100 orders whose first delivery is failing, each
    with a second event waiting, and a new order behind them: its delivery is claimed at once."""
    await make_product(client, total_stock=1000)
    sink = await db.fetchval("INSERT INTO event_sinks (id, kind, url, secret) VALUES "
                             "(gen_random_uuid(), 'webhook', 'http://127.0.0.1:9/h', 'whsec_x') RETURNING id")
    await _fan_out_all(db)
    first = list(await orders_repo.insert_many(db, await _new_orders(db, "P1001", 100)))
    await _fan_out_all(db)
    await db.execute("""INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data)
                        SELECT id, 'pending', 'cancelled', 'U1', 'test', 2, 'cancelled', '{}' FROM orders""")
    await _fan_out_all(db)  # the second events: due at once, as their first ones have not been tried yet
    claimed = [*await _claim(db), *await _claim(db)]
    assert sorted(r["sequence"] for r in claimed) == [1] * 100, "a second event was claimed before its first"
    await events_repo.record(db, [events_repo.Outcome(r["id"], sink, False, 3600.0, 500) for r in claimed],
                             disable_after_s=1e6)
    [late] = await orders_repo.insert_many(db, await _new_orders(db, "P1001", 1))
    await _fan_out_all(db)
    assert [(r["order_id"], r["sequence"]) for r in await _claim(db)] == [(late, 1)]
    await events_repo.record(db, [events_repo.Outcome(claimed[0]["id"], sink, True, 0.0, 204)], disable_after_s=1e6)
    assert [(r["order_id"], r["sequence"]) for r in await _claim(db)] == [(claimed[0]["order_id"], 2)]
    assert len(first) == 100  # every order of the set-up was written


async def _fan_out_all(db: asyncpg.Connection) -> None:
    while await events_repo.fan_out(db, limit=1000, retry_for_s=86_400):
        pass


async def _claim(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await events_repo.claim(db, kind="webhook", limit=64, lease_s=30.0)


@contextlib.asynccontextmanager
async def relaying(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Relay]]:
    """Like `serving`, with the in-process relay at hand."""
    async with served(settings) as (application, client):
        assert isinstance(application.state.relay, Relay)
        yield client, application.state.relay


@contextlib.asynccontextmanager
async def burst_of_orders(client: httpx.AsyncClient) -> AsyncIterator[list[str]]:
    """Orders created one after another, as fast as this client goes, until the block ends; their ids."""
    created: list[str] = []

    async def write() -> None:
        while True:
            r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1},
                                  headers=bearer(f"B{len(created)}"))
            assert r.status_code == 201, r.text
            created.append(r.json()["order_id"])

    writer = asyncio.create_task(write())
    try:
        yield created
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    assert created  # the writer did not fail


async def test_a_burst_of_orders_holds_deliveries_back_and_they_all_go_when_it_ends(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    burst = relay_settings(settings, relay_burst_events_per_s=5, relay_burst_max_wait_s=50)
    async with relaying(burst) as (client, relay):
        await make_product(client, total_stock=100_000)
        await endpoint(client, receiver, "h")
        async with burst_of_orders(client) as created:
            await eventually(_until(lambda: relay.burst.yielding), within=20)
            held_at, written_at = len(receiver.events("h")), len(created)
            await eventually(_until(lambda: len(created) >= written_at + 100), within=60)
            assert relay.burst.yielding, f"the burst ran at {relay.burst.rate:.0f} events/s"
            # One claim sent when the relay began to yield may finish meanwhile; nothing after it.
            assert len(receiver.events("h")) <= held_at + 64, (held_at, len(receiver.events("h")))
        await eventually(_until(lambda: not relay.burst.yielding), within=20)
        await eventually(lambda: assert_events_delivered(db, {"h": receiver.events("h")}), within=30)
        metrics = (await client.get("/metrics")).text
        assert "preorder_events_relay_yielding 0.0" in metrics


async def test_in_a_burst_longer_than_the_bound_events_wait_no_longer_than_it(
    settings: Settings, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async with relaying(relay_settings(settings, relay_burst_events_per_s=5, relay_burst_max_wait_s=1)) as (
        client, relay
    ):
        await make_product(client, total_stock=100_000)
        await endpoint(client, receiver, "h")
        async with burst_of_orders(client) as created:
            await eventually(_until(lambda: relay.burst.yielding), within=20)
            yielded_after = list(created)

            async def sent_in_the_burst() -> None:
                got = {e["subject"] for e in receiver.events("h")}
                assert set(yielded_after) <= got, f"{len(set(yielded_after) - got)} not delivered yet"
                assert relay.burst.rate > 5, f"the burst ended ({relay.burst.rate:.0f} events/s)"

            await eventually(sent_in_the_burst, within=30)
        await eventually(lambda: assert_events_delivered(db, {"h": receiver.events("h")}), within=30)


def _until(condition: Callable[[], bool]) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        assert condition()

    return check
