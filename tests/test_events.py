"""The outbox rows every order write leaves, the webhook endpoint API (admin, SSRF rules) and the pull feed."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from preorder.events.envelope import order_data
from preorder.settings import Settings
from tests.conftest import ADMIN, bearer, make_product, make_settings, serving

CUSTOMER = bearer("U1")
OTHER = bearer("U2")


async def _order(client: httpx.AsyncClient, headers: dict[str, str] = CUSTOMER) -> dict[str, Any]:
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _pay(client: httpx.AsyncClient, order: dict[str, Any], ref: str) -> dict[str, Any]:
    body = {"status": "paid", "payment": {"reference": ref, "amount": order["amount_due"]}}
    r = await client.put(f"/api/preorder/{order['order_id']}", json=body, headers=CUSTOMER)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_every_change_writes_an_event_with_the_next_sequence_and_the_order_after_it(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await make_product(client)
    order = await _order(client)
    paid = await _pay(client, order, "PAY-1")
    r = await client.put(f"/api/preorder/{order['order_id']}", json={"status": "shipped"}, headers=ADMIN)
    shipped = r.json()
    rows = await db.fetch("SELECT event_id, sequence, type, data, (e.txid, e.id) > (f.txid, f.id) AS unsent "
                          "FROM order_events e, event_fanout f WHERE order_id = $1 ORDER BY sequence",
                          uuid.UUID(order["order_id"]))
    assert [(r["sequence"], r["type"]) for r in rows] == [(1, "created"), (2, "payment_recorded"), (3, "paid"),
                                                               (4, "shipped")]
    assert len({r["event_id"] for r in rows}) == 4
    assert all(r["unsent"] for r in rows)  # waiting for the relay: after its cursor
    got = await client.get(f"/api/preorder/{order['order_id']}", headers=CUSTOMER)
    assert order_data(orjson.loads(rows[3]["data"])) == shipped == got.json()
    assert order_data(orjson.loads(rows[2]["data"])) == paid == order_data(orjson.loads(rows[1]["data"]))
    assert order_data(orjson.loads(rows[0]["data"])) == order


async def test_an_expired_order_gets_its_cancelled_event(client: httpx.AsyncClient, db: asyncpg.Connection,
                                                         app: Any) -> None:
    await make_product(client)
    order = await _order(client)
    await db.execute("UPDATE orders SET pay_by = now() - interval '1 second' WHERE id = $1",
                     uuid.UUID(order["order_id"]))
    assert await app.state.orders.expire_due() == 1
    rows = await db.fetch("SELECT sequence, type, data FROM order_events WHERE order_id = $1 ORDER BY sequence",
                          uuid.UUID(order["order_id"]))
    assert [(r["sequence"], r["type"], orjson.loads(r["data"])["status"]) for r in rows] == [
        (1, "created", "pending"), (2, "cancelled", "cancelled")]


async def test_a_group_commit_batch_writes_one_created_event_per_order(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await make_product(client)
    orders = await asyncio.gather(*(_order(client, bearer(f"U{i}")) for i in range(40)))
    rows = await db.fetch("SELECT order_id, sequence, type FROM order_events")
    assert sorted(str(r["order_id"]) for r in rows) == sorted(o["order_id"] for o in orders)
    assert {(r["sequence"], r["type"]) for r in rows} == {(1, "created")}


# ---- webhook endpoints ----------------------------------------------------------------------------------------

async def test_an_endpoint_is_created_with_its_secret_shown_once(client: httpx.AsyncClient,
                                                                 db: asyncpg.Connection) -> None:
    r = await client.post("/api/webhooks", json={"url": "http://127.0.0.1:9/hook", "description": "shop"},
                          headers=ADMIN)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["secret"].startswith("whsec_") and created["status"] == "active"
    assert created["event_types"] is None
    listed = (await client.get("/api/webhooks", headers=ADMIN)).json()["items"]
    assert [e["id"] for e in listed] == [created["id"]] and "secret" not in listed[0]
    one = (await client.get(f"/api/webhooks/{created['id']}", headers=ADMIN)).json()
    assert "secret" not in one and one["url"] == "http://127.0.0.1:9/hook"


async def test_pause_rotate_and_delete(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    created = (await client.post("/api/webhooks", json={"url": "http://127.0.0.1:9/h"}, headers=ADMIN)).json()
    url = f"/api/webhooks/{created['id']}"
    paused = (await client.patch(url, json={"status": "paused"}, headers=ADMIN)).json()
    assert paused["status"] == "paused" and paused["secret"] is None
    rotated = (await client.patch(url, json={"rotate_secret": True}, headers=ADMIN)).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    typed = (await client.patch(url, json={"event_types": ["preorder.order.paid"]}, headers=ADMIN)).json()
    assert typed["event_types"] == ["preorder.order.paid"] and typed["status"] == "paused"
    assert (await client.delete(url, headers=ADMIN)).status_code == 204
    assert (await client.get(url, headers=ADMIN)).status_code == 404
    assert (await client.delete(url, headers=ADMIN)).status_code == 404


async def test_only_admins_manage_endpoints(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    r = await client.post("/api/webhooks", json={"url": "http://127.0.0.1:9/h"}, headers=CUSTOMER)
    assert r.status_code == 403
    assert (await client.get("/api/webhooks", headers=CUSTOMER)).status_code == 403
    assert await db.fetchval("SELECT count(*) FROM event_sinks") == 0


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8080/hook", "http://10.1.2.3/hook", "http://192.168.0.1/",
    "http://169.254.169.254/latest/meta-data", "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook",
    "http://0.0.0.0/", "ftp://example.com/x",
])
async def test_private_and_metadata_addresses_are_refused(settings: Settings, db: asyncpg.Connection,
                                                          url: str) -> None:
    async with serving(make_settings(settings.database_url, settings.redis_url, webhook_allow_private=False)) as client:
        r = await client.post("/api/webhooks", json={"url": url}, headers=ADMIN)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/problem+json"
    assert await db.fetchval("SELECT count(*) FROM event_sinks") == 0


async def test_private_addresses_are_allowed_when_configured(settings: Settings, db: asyncpg.Connection) -> None:
    assert settings.webhook_allow_private  # the suite's setting, as `preorder dev`'s
    async with serving(settings) as client:
        r = await client.post("/api/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=ADMIN)
    assert r.status_code == 201


# ---- the pull feed -------------------------------------------------------------------------------------------

async def _settled(db: asyncpg.Connection) -> None:
    """Age every event past the feed's settle bound (instead of waiting for it)."""
    await db.execute("UPDATE order_events SET created_at = created_at - interval '1 hour'")


async def test_the_feed_pages_oldest_first_and_a_customer_sees_only_its_orders(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await make_product(client)
    mine = await _order(client)
    await _pay(client, mine, "PAY-F")
    theirs = await _order(client, OTHER)
    await _settled(db)
    first = (await client.get("/api/events?limit=2", headers=ADMIN)).json()
    assert [(e["subject"], e["type"]) for e in first["items"]] == [
        (mine["order_id"], "preorder.order.created"), (mine["order_id"], "preorder.order.payment_recorded")]
    rest = (await client.get(f"/api/events?after={first['next_cursor']}", headers=ADMIN)).json()
    assert [e["subject"] for e in rest["items"]] == [mine["order_id"], theirs["order_id"]]  # paid, then created
    idle = (await client.get(f"/api/events?after={rest['next_cursor']}", headers=ADMIN)).json()
    assert idle == {"items": [], "next_cursor": rest["next_cursor"]}
    own = (await client.get("/api/events", headers=CUSTOMER)).json()["items"]
    assert {e["subject"] for e in own} == {mine["order_id"]}
    event = own[1]
    assert event["specversion"] == "1.0" and event["sequence"] == 2 and event["source"] == "/preorder"
    assert event["data"]["status"] == "paid" and event["data"]["order_id"] == mine["order_id"]


async def test_the_feed_holds_back_events_that_may_still_have_earlier_ones_committing(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await make_product(client)
    await _order(client)
    assert (await client.get("/api/events", headers=ADMIN)).json()["items"] == []
    await _settled(db)
    assert len((await client.get("/api/events", headers=ADMIN)).json()["items"]) == 1


@pytest.mark.parametrize("query", ["after=-1", "after=abc", "limit=0", "limit=1001", "after=1&x=1"])
async def test_bad_feed_queries_are_400(client: httpx.AsyncClient, query: str) -> None:
    assert (await client.get(f"/api/events?{query}", headers=ADMIN)).status_code == 400


async def test_the_openapi_document_lists_every_event_type_as_a_webhook(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    assert set(doc["webhooks"]) == {f"preorder.order.{t}" for t in
                                    ("created", "deposit_paid", "paid", "shipped", "completed", "cancelled",
                                     "forfeited", "payment_recorded", "refund_created", "refund_succeeded")}
    body = doc["webhooks"]["preorder.order.paid"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/OrderEvent")


async def test_an_event_row_written_without_the_outbox_columns_still_gets_them(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await make_product(client)
    order = await _order(client)
    oid = uuid.UUID(order["order_id"])
    await db.execute("INSERT INTO order_events (order_id, from_status, to_status, actor, reason) "
                     "VALUES ($1, 'pending', 'cancelled', 'ops', 'by hand')", oid)
    row = await db.fetchrow("SELECT sequence, type, data FROM order_events WHERE order_id = $1 AND sequence = 2", oid)
    assert row is not None and row["type"] == "cancelled"
    assert orjson.loads(row["data"])["id"] == order["order_id"]
