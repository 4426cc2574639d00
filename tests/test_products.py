"""Products: admin writes, public reads with live stock, presale window, stock changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.conftest import ADMIN, bearer, make_product
from tests.invariants import assert_invariants

U1 = bearer("U1")


def iso(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


async def test_product_shows_total_reserved_and_available_live(client):
    created = await make_product(client, total_stock=7)
    assert (created["total_stock"], created["reserved"], created["available"]) == (7, 0, 7)
    await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 3}, headers=U1)
    got = (await client.get("/api/products/P1001")).json()
    assert (got["reserved"], got["available"]) == (3, 4)
    listed = (await client.get("/api/products")).json()
    assert [p["id"] for p in listed["items"]] == ["P1001"] and listed["items"][0]["available"] == 4


async def test_duplicate_product_is_409(client):
    await make_product(client)
    r = await client.post("/api/products", json={"id": "P1001", "name": "x", "price_amount": 1, "total_stock": 1},
                          headers=ADMIN)
    assert r.status_code == 409


async def test_presale_not_started_or_ended_is_409_and_stock_untouched(client, db, redis):
    await make_product(client, "EARLY", starts_at=iso(timedelta(hours=1)), total_stock=5)
    await make_product(client, "LATE", starts_at=iso(-timedelta(hours=2)), ends_at=iso(-timedelta(hours=1)),
                       total_stock=5)
    for pid, word in (("EARLY", "not started"), ("LATE", "ended")):
        r = await client.post("/api/preorder", json={"product_id": pid, "quantity": 1}, headers=U1)
        assert r.status_code == 409 and word in r.json()["detail"]
        assert r.json()["type"] == "/problems/presale-closed"
        assert (await client.get(f"/api/products/{pid}")).json()["available"] == 5
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    await assert_invariants(db, redis)


async def test_opening_the_window_by_patch_takes_effect_at_once(client):
    await make_product(client, starts_at=iso(timedelta(hours=1)))
    assert (await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1},
                              headers=U1)).status_code == 409
    r = await client.patch("/api/products/P1001", json={"starts_at": iso(-timedelta(minutes=1))}, headers=ADMIN)
    assert r.status_code == 200
    assert (await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1},
                              headers=U1)).status_code == 201


async def test_stock_cannot_go_below_reserved(client, db, redis):
    await make_product(client, total_stock=10)
    await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 6}, headers=U1)
    r = await client.patch("/api/products/P1001", json={"total_stock": 5}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["reserved"] == 6
    r = await client.patch("/api/products/P1001", json={"total_stock": 20}, headers=ADMIN)
    assert r.status_code == 200 and (r.json()["available"], r.json()["reserved"]) == (14, 6)
    await assert_invariants(db, redis)


async def test_product_writes_are_admin_only(client):
    await make_product(client)
    body = {"id": "P2", "name": "x", "price_amount": 1, "total_stock": 1}
    assert (await client.post("/api/products", json=body, headers=U1)).status_code == 403
    assert (await client.patch("/api/products/P1001", json={"total_stock": 1}, headers=U1)).status_code == 403
    assert (await client.post("/api/products", json=body)).status_code == 401


async def test_unknown_product_is_404(client):
    r = await client.get("/api/products/NOPE")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
