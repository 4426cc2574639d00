"""Payment confirmation: an order is paid only by a reference and the exact amount due (in its currency),
one reference pays one order, and a refused payment changes nothing. Cancelling a paid order refunds it once."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ADMIN, bearer, make_product
from tests.invariants import assert_invariants

U1 = bearer("U1")
DUE = 2 * 2999


async def place(client: httpx.AsyncClient, who: dict[str, str] = U1) -> dict[str, Any]:
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 2}, headers=who)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def mark_paid(client: httpx.AsyncClient, order: dict[str, Any], payment: Any,
                    who: dict[str, str] = U1) -> httpx.Response:
    body: dict[str, Any] = {"status": "paid"}
    if payment is not None:
        body["payment"] = payment
    return await client.put(f"/api/preorder/{order['order_id']}", json=body, headers=who)


async def order_state(db: asyncpg.Connection, client: httpx.AsyncClient, order_id: str) -> tuple[Any, ...]:
    row = await db.fetchrow("SELECT status, payment_reference, amount_paid, updated_at FROM orders WHERE id = $1",
                            order_id)
    events = await db.fetchval("SELECT count(*) FROM order_events WHERE order_id = $1", order_id)
    product = (await client.get("/api/products/P1001")).json()
    return tuple(row), events, product["reserved"], product["available"]


@pytest.fixture
async def order(client: httpx.AsyncClient) -> dict[str, Any]:
    await make_product(client, total_stock=10)
    placed = await place(client)
    assert placed["amount_due"] == DUE and placed["currency"] == "USD"
    return placed


REFUSED = [
    pytest.param({"reference": "PAY-1", "amount": DUE - 1}, 409, id="amount-short-by-one-cent"),
    pytest.param({"reference": "PAY-1", "amount": DUE + 1}, 409, id="amount-over-by-one-cent"),
    pytest.param({"reference": "PAY-1", "amount": 0}, 409, id="amount-zero"),
    pytest.param(None, 400, id="payment-missing"),
    pytest.param({"amount": DUE}, 400, id="reference-missing"),
    pytest.param({"reference": "", "amount": DUE}, 400, id="reference-empty"),
    pytest.param({"reference": "PAY 1", "amount": DUE}, 400, id="reference-with-space"),
    pytest.param({"reference": "PAY-1"}, 400, id="amount-missing"),
    pytest.param({"reference": "PAY-1", "amount": DUE, "currency": "EUR"}, 409, id="wrong-currency"),
    pytest.param({"reference": "PAY-1", "amount": DUE, "currency": "usd"}, 400, id="currency-not-iso-4217"),
    pytest.param({"reference": "PAY-1", "amount": float(DUE)}, 400, id="amount-as-float"),
    pytest.param({"reference": "PAY-1", "amount": str(DUE)}, 400, id="amount-as-string"),
    pytest.param({"reference": "PAY-1", "amount": -DUE}, 400, id="amount-negative"),
]


@pytest.mark.parametrize(("payment", "status"), REFUSED)
async def test_refused_payment_changes_nothing(client, db, redis, order, payment, status):
    before = await order_state(db, client, order["order_id"])
    r = await mark_paid(client, order, payment)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status and r.json()["detail"]
    assert await order_state(db, client, order["order_id"]) == before
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_an_amount_mismatch_says_what_is_due(client, order):
    problem = (await mark_paid(client, order, {"reference": "PAY-1", "amount": 1})).json()
    assert (problem["amount_due"], problem["currency"]) == (DUE, "USD")


async def test_exact_payment_marks_the_order_paid_and_records_it(client, db, order):
    r = await mark_paid(client, order, {"reference": "PAY-1", "amount": DUE, "currency": "USD"})
    assert r.status_code == 200, r.text
    paid = r.json()
    assert (paid["status"], paid["payment_reference"], paid["amount_paid"]) == ("paid", "PAY-1", DUE)
    events = await db.fetch("SELECT to_status, actor, reason FROM order_events WHERE order_id = $1 ORDER BY id",
                            order["order_id"])
    assert [tuple(e) for e in events][-1] == ("paid", "U1", "payment_confirmed")


async def test_one_reference_pays_one_order(client, db, redis, order):
    second = await place(client)
    assert (await mark_paid(client, order, {"reference": "PAY-1", "amount": DUE})).status_code == 200
    before = await order_state(db, client, second["order_id"])
    reused = await mark_paid(client, second, {"reference": "PAY-1", "amount": DUE})
    assert reused.status_code == 409 and reused.headers["content-type"] == "application/problem+json"
    assert reused.json()["type"] == "/problems/payment-reference-used"
    assert await order_state(db, client, second["order_id"]) == before
    await assert_invariants(db, redis, created=[order["order_id"], second["order_id"]])


async def test_a_reference_stays_spent_after_its_order_is_refunded(client, db, order):
    assert (await mark_paid(client, order, {"reference": "PAY-1", "amount": DUE})).status_code == 200
    assert (await client.delete(f"/api/preorder/{order['order_id']}", headers=U1)).status_code == 200
    other = await place(client, bearer("U2"))
    r = await mark_paid(client, other, {"reference": "PAY-1", "amount": DUE}, who=bearer("U2"))
    assert r.status_code == 409
    assert await db.fetchval("SELECT status FROM orders WHERE id = $1", other["order_id"]) == "pending"


async def test_a_reference_reused_by_another_customer_is_refused(client, db, order):
    assert (await mark_paid(client, order, {"reference": "PAY-1", "amount": DUE})).status_code == 200
    bobs = await place(client, bearer("U2"))
    r = await mark_paid(client, bobs, {"reference": "PAY-1", "amount": DUE}, who=bearer("U2"))
    assert r.status_code == 409
    assert await db.fetchval("SELECT payment_reference FROM orders WHERE id = $1", bobs["order_id"]) is None


async def test_an_order_is_paid_only_once(client, db, order):
    assert (await mark_paid(client, order, {"reference": "PAY-1", "amount": DUE})).status_code == 200
    again = await mark_paid(client, order, {"reference": "PAY-2", "amount": DUE})
    assert again.status_code == 409
    assert await db.fetchval("SELECT payment_reference FROM orders") == "PAY-1"


# ---- refunds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["delete", "put"])
async def test_cancelling_a_paid_order_writes_exactly_one_refund_of_the_amount_paid(client, db, redis, order, how):
    assert (await mark_paid(client, order, {"reference": "PAY-1", "amount": DUE})).status_code == 200
    url = f"/api/preorder/{order['order_id']}"
    # The second cancel refunds nothing more: DELETE answers the same order, PUT says it is cancelled already.
    for expected in (200, 200 if how == "delete" else 409):
        r = await (client.delete(url, headers=U1) if how == "delete" else
                   client.put(url, json={"status": "cancelled", "reason": "changed my mind"}, headers=U1))
        assert r.status_code == expected, r.text
    refunds = await db.fetch("SELECT order_id, amount, currency, payment_reference FROM refunds")
    assert [tuple(r) for r in refunds] == [(uuid.UUID(order["order_id"]), DUE, "USD", "PAY-1")]
    assert await db.fetchval("SELECT amount_paid FROM orders") == DUE
    assert (await client.get("/api/products/P1001")).json()["available"] == 10
    await assert_invariants(db, redis)


async def test_cancelling_an_unpaid_order_writes_no_refund(client, db, order):
    assert (await client.delete(f"/api/preorder/{order['order_id']}", headers=U1)).status_code == 200
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0


async def test_a_shipped_order_cannot_be_cancelled_so_nothing_is_refunded(client, db, order):
    assert (await mark_paid(client, order, {"reference": "PAY-1", "amount": DUE})).status_code == 200
    assert (await client.put(f"/api/preorder/{order['order_id']}", json={"status": "shipped"},
                             headers=ADMIN)).status_code == 200
    assert (await client.delete(f"/api/preorder/{order['order_id']}", headers=ADMIN)).status_code == 409
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0


# ---- paying at create time ----------------------------------------------------------------------------


async def test_paying_at_create_with_the_exact_amount_answers_a_paid_order(client, db, redis):
    await make_product(client, total_stock=10)
    body = {"product_id": "P1001", "quantity": 2, "payment": {"reference": "PAY-9", "amount": DUE}}
    r = await client.post("/api/preorder", json=body, headers=U1)
    assert r.status_code == 201 and r.json()["status"] == "paid" and r.json()["amount_paid"] == DUE
    await assert_invariants(db, redis, created=[r.json()["order_id"]])


@pytest.mark.parametrize("payment", [
    pytest.param({"reference": "PAY-9", "amount": DUE - 1}, id="wrong-amount"),
    pytest.param({"reference": "PAY-9", "amount": DUE, "currency": "EUR"}, id="wrong-currency"),
])
async def test_a_refused_payment_at_create_leaves_no_live_order_and_no_stock_held(client, db, redis, payment):
    await make_product(client, total_stock=10)
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 2, "payment": payment},
                          headers=U1)
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/payment-mismatch"
    assert await db.fetchval("SELECT count(*) FROM orders") == 0, "refused before anything is written"
    assert await db.fetchval("SELECT count(*) FROM orders WHERE payment_reference IS NOT NULL") == 0
    assert (await client.get("/api/products/P1001")).json()["available"] == 10
    await assert_invariants(db, redis)
