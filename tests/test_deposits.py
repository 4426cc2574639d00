"""Deposit + balance presales: the plan's rules at the product, payments as recorded facts (once per reference,
exact amounts, a balance only inside its window), late payments recorded and refunded, cancels by either side, and
the sweeper's two deadlines. Time is moved with the service's clock, never slept through. I1-I6 after each."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from preorder.db import asyncpg_dsn
from preorder.orders import repository as repo
from tests.conftest import ADMIN, bearer, make_product
from tests.harness import eventually
from tests.invariants import assert_invariants

U1 = bearer("U1")
PRICE, DEPOSIT, CREDIT, QTY = 50_000, 10_000, 15_000, 2
HOUR = 3600


def plan(**over: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "price_amount": PRICE, "total_stock": 10, "payment_plan": "deposit", "deposit_amount": DEPOSIT,
        "deposit_credit": CREDIT, "balance_starts_at": (now + timedelta(hours=1)).isoformat(),
        "balance_ends_at": (now + timedelta(hours=2)).isoformat(),
    }
    fields.update(over)
    return fields


@pytest.fixture
def clock(app: Any) -> Any:
    return app.state.orders.clock


async def place(client: httpx.AsyncClient, who: dict[str, str] = U1, **body: Any) -> dict[str, Any]:
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": QTY, **body}, headers=who)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def pay(client: httpx.AsyncClient, order: dict[str, Any], kind: str, reference: str, *,
              amount: int | None = None, currency: str = "USD", who: dict[str, str] = U1) -> httpx.Response:
    due = {"deposit": order["deposit_due"], "balance": order["balance_due"], "full": order["amount_due"]}[kind]
    body = {"kind": kind, "reference": reference, "amount": due if amount is None else amount, "currency": currency}
    return await client.post(f"/api/preorder/{order['order_id']}/payments", json=body, headers=who)


async def status_of(client: httpx.AsyncClient, order: dict[str, Any]) -> str:
    return str((await client.get(f"/api/preorder/{order['order_id']}", headers=ADMIN)).json()["status"])


async def reserved(client: httpx.AsyncClient) -> int:
    return int((await client.get("/api/products/P1001")).json()["reserved"])


# ---- the plan at the product -------------------------------------------------------------------------------

INCONSISTENT = [
    pytest.param({"deposit_amount": None}, id="deposit-missing"),
    pytest.param({"deposit_amount": PRICE}, id="deposit-not-below-price"),
    pytest.param({"deposit_credit": DEPOSIT - 1}, id="credit-below-deposit"),
    pytest.param({"deposit_credit": PRICE}, id="credit-not-below-price"),
    pytest.param({"balance_ends_at": None}, id="balance-end-missing"),
    pytest.param({"balance_ends_at": datetime.now(UTC).isoformat()}, id="balance-ends-before-it-starts"),
    pytest.param({"starts_at": (datetime.now(UTC) + timedelta(hours=3)).isoformat(),
                  "ends_at": (datetime.now(UTC) + timedelta(hours=4)).isoformat()}, id="balance-before-presale-opens"),
    pytest.param({"payment_plan": "full"}, id="full-plan-with-deposit-fields"),
    pytest.param({"deposit_window_seconds": 0}, id="deposit-window-zero"),
]


@pytest.mark.parametrize("over", INCONSISTENT)
async def test_an_inconsistent_plan_is_refused_and_nothing_is_created(client, db, over):
    body = {"id": "P1001", "name": "Console", "currency": "USD", **plan(**over)}
    r = await client.post("/api/products", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert await db.fetchval("SELECT count(*) FROM products") == 0


async def test_a_plan_defaults_its_credit_and_deposit_window_and_a_patch_cannot_break_it(client):
    product = await make_product(client, **plan(deposit_credit=None))
    assert (product["deposit_credit"], product["deposit_window_seconds"]) == (DEPOSIT, 1800)
    assert (product["payment_plan"], product["deposit_refundable"]) == ("deposit", False)
    r = await client.patch("/api/products/P1001", json={"price_amount": DEPOSIT}, headers=ADMIN)
    assert r.status_code == 409 and "payment_plan" in r.json()["detail"], r.text
    assert (await client.get("/api/products/P1001")).json()["price_amount"] == PRICE


async def test_a_full_plan_product_is_unchanged(client):
    product = await make_product(client)
    assert (product["payment_plan"], product["deposit_amount"], product["balance_starts_at"]) == ("full", 0, None)
    order = await place(client)
    assert (order["deposit_due"], order["balance_due"], order["paid"]) == (0, order["amount_due"], 0)


# ---- deposit, then balance ---------------------------------------------------------------------------------

async def test_deposit_then_balance_in_its_window_pays_the_order(client, db, redis, clock):
    await make_product(client, **plan())
    order = await place(client)
    assert (order["status"], order["deposit_due"], order["balance_due"]) == (
        "pending", DEPOSIT * QTY, PRICE * QTY - CREDIT * QTY)
    r = await pay(client, order, "deposit", "DEP-1")
    assert r.status_code == 201, r.text
    assert (r.json()["order"]["status"], r.json()["payment"]["outcome"], r.json()["refunds"]) == (
        "deposit_paid", "applied", [])

    early = await pay(client, order, "balance", "BAL-1")
    assert early.status_code == 409 and early.json()["type"] == "/problems/balance-window-not-open", early.text
    assert datetime.fromisoformat(early.json()["balance_starts_at"]) == datetime.fromisoformat(
        order["balance_starts_at"].replace("Z", "+00:00"))
    assert await db.fetchval("SELECT count(*) FROM payments") == 1, "a refused balance records nothing"

    clock.advance(HOUR + 1)
    r = await pay(client, order, "balance", "BAL-1")
    assert r.status_code == 201, r.text
    paid = r.json()["order"]
    assert (paid["status"], paid["paid"], paid["refunded"]) == ("paid", DEPOSIT * QTY + paid["balance_due"], 0)
    listed = (await client.get(f"/api/preorder/{order['order_id']}/payments", headers=U1)).json()["items"]
    assert [(p["kind"], p["outcome"]) for p in listed] == [("deposit", "applied"), ("balance", "applied")]
    events = (await client.get(f"/api/preorder/{order['order_id']}/events", headers=U1)).json()["items"]
    assert [e["type"] for e in events] == [
        "created", "payment_recorded", "deposit_paid", "payment_recorded", "paid"]
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_a_reference_is_recorded_once(client, db, redis):
    await make_product(client, **plan())
    order = await place(client)
    first = await pay(client, order, "deposit", "DEP-1")
    again = await pay(client, order, "deposit", "DEP-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["payment"] == first.json()["payment"]
    other_body = await pay(client, order, "deposit", "DEP-1", amount=DEPOSIT * QTY + 1)
    assert other_body.status_code == 409 and other_body.json()["type"] == "/problems/payment-reference-used"
    assert await db.fetchval("SELECT count(*) FROM payments") == 1
    await assert_invariants(db, redis, created=[order["order_id"]])


REFUSED = [
    pytest.param({"kind": "deposit", "amount": DEPOSIT * QTY - 1}, 409, id="deposit-short-by-one"),
    pytest.param({"kind": "deposit", "currency": "EUR"}, 409, id="wrong-currency"),
    pytest.param({"kind": "full"}, 409, id="full-payment-on-a-deposit-plan"),
    pytest.param({"kind": "balance"}, 409, id="balance-before-its-window"),
    pytest.param({"kind": "deposit", "amount": 0}, 409, id="amount-zero"),
    pytest.param({"kind": "deposit", "amount": -1}, 400, id="amount-negative"),
    pytest.param({"kind": "deposit", "currency": "usd"}, 400, id="currency-not-iso"),
]


@pytest.mark.parametrize(("over", "code"), REFUSED)
async def test_a_refused_payment_changes_nothing(client, db, redis, over, code):
    await make_product(client, **plan())
    order = await place(client)
    before = await db.fetchrow("SELECT * FROM orders")
    kind = over.pop("kind")
    r = await pay(client, order, kind, "PAY-X", **over)
    assert r.status_code == code, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert await db.fetchrow("SELECT * FROM orders") == before
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_put_paid_keeps_working_for_full_plans_and_points_deposit_plans_to_payments(client, db, redis):
    await make_product(client, **plan())
    order = await place(client)
    r = await client.put(f"/api/preorder/{order['order_id']}", headers=U1,
                         json={"status": "paid", "payment": {"reference": "P-1", "amount": order["amount_due"]}})
    assert r.status_code == 409 and "payments" in r.json()["detail"], r.text
    await make_product(client, "P2")
    full = (await client.post("/api/preorder", json={"product_id": "P2", "quantity": 1}, headers=U1)).json()
    r = await client.put(f"/api/preorder/{full['order_id']}", headers=U1,
                         json={"status": "paid", "payment": {"reference": "P-2", "amount": full["amount_due"]}})
    assert r.status_code == 200 and r.json()["status"] == "paid" and r.json()["paid"] == full["amount_due"]
    await assert_invariants(db, redis, created=[order["order_id"], full["order_id"]])


async def test_paying_at_create_pays_the_deposit_as_its_real_actor(client, db, redis):
    await make_product(client, **plan())
    body = {"product_id": "P1001", "quantity": QTY, "user_id": "U1",
            "payment": {"reference": "DEP-C", "amount": DEPOSIT * QTY}}
    r = await client.post("/api/preorder", json=body, headers=ADMIN)
    assert r.status_code == 201 and r.json()["status"] == "deposit_paid", r.text
    assert await db.fetchval("SELECT actor FROM payments") == "admin-1"
    await assert_invariants(db, redis, created=[r.json()["order_id"]])


# ---- deadlines ------------------------------------------------------------------------------------------

async def test_a_deposit_not_paid_in_its_window_cancels_and_a_late_one_is_refunded(client, db, redis, app, clock):
    await make_product(client, **plan(deposit_window_seconds=60))
    order = await place(client)
    assert await reserved(client) == QTY
    clock.advance(61)
    assert await app.state.orders.expire_due() == 1
    assert await app.state.orders.expire_due() == 0
    assert await status_of(client, order) == "cancelled" and await reserved(client) == 0
    assert await db.fetchval("SELECT reason FROM order_events WHERE to_status = 'cancelled'") == "deposit_timeout"

    late = await pay(client, order, "deposit", "DEP-LATE")
    assert late.status_code == 201, late.text
    body = late.json()
    assert (body["order"]["status"], body["payment"]["outcome"]) == ("cancelled", "refunded")
    assert [(r["amount"], r["status"], r["reason"]) for r in body["refunds"]] == [
        (DEPOSIT * QTY, "pending", "late_payment")]
    refund_id = body["refunds"][0]["refund_id"]
    path = f"/api/preorder/{order['order_id']}/refunds/{refund_id}/succeeded"
    assert (await client.post(path, json={"provider_reference": "RF-1"}, headers=U1)).status_code == 403
    done = await client.post(path, json={"provider_reference": "RF-1"}, headers=ADMIN)
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    assert (await client.post(path, json={"provider_reference": "RF-1"}, headers=ADMIN)).status_code == 200
    assert (await client.post(path, json={"provider_reference": "RF-2"}, headers=ADMIN)).status_code == 409
    refunds = (await client.get(f"/api/preorder/{order['order_id']}/refunds", headers=U1)).json()["items"]
    assert [(r["status"], r["provider_reference"]) for r in refunds] == [("succeeded", "RF-1")]
    events = (await client.get(f"/api/preorder/{order['order_id']}/events", headers=ADMIN)).json()["items"]
    assert [(e["type"], e["from_status"], e["to_status"], e["actor"]) for e in events][-3:] == [
        ("payment_recorded", "cancelled", "cancelled", "U1"), ("refund_created", "cancelled", "cancelled", "U1"),
        ("refund_succeeded", "cancelled", "cancelled", "admin-1")], "one event for the refund paid back, not per call"
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_a_balance_not_paid_in_its_window_forfeits_and_keeps_the_deposit(client, db, redis, app, clock):
    await make_product(client, **plan())
    order = await place(client)
    assert (await pay(client, order, "deposit", "DEP-1")).status_code == 201
    clock.advance(2 * HOUR)
    assert await app.state.orders.forfeit_due() == 1
    assert await app.state.orders.forfeit_due() == 0
    assert await status_of(client, order) == "forfeited" and await reserved(client) == 0
    events = (await client.get(f"/api/preorder/{order['order_id']}/events", headers=ADMIN)).json()["items"]
    assert [(e["type"], e["from_status"], e["actor"], e["reason"]) for e in events if e["to_status"] == "forfeited"
            ] == [("forfeited", "deposit_paid", "system", "balance_timeout")], "one event for the forfeiture"
    late = await pay(client, order, "balance", "BAL-LATE")
    assert late.status_code == 201 and late.json()["payment"]["outcome"] == "refunded", late.text
    assert late.json()["order"]["status"] == "forfeited", "a late payment never re-opens the order"
    refunds = await db.fetch("SELECT amount, reason FROM refunds")
    assert [tuple(r) for r in refunds] == [(order["balance_due"], "late_payment")], "the deposit is kept"
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_a_balance_paid_after_its_window_but_before_the_sweeper_is_refunded(client, db, redis, app, clock):
    await make_product(client, **plan())
    order = await place(client)
    assert (await pay(client, order, "deposit", "DEP-1")).status_code == 201
    clock.advance(2 * HOUR)
    late = await pay(client, order, "balance", "BAL-LATE")
    assert late.status_code == 201 and late.json()["order"]["status"] == "deposit_paid", late.text
    assert late.json()["payment"]["outcome"] == "refunded"
    assert await app.state.orders.forfeit_due() == 1
    await assert_invariants(db, redis, created=[order["order_id"]])


# ---- cancels ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("refundable", "who", "refunded"), [
    pytest.param(False, U1, 0, id="customer-after-deposit-forfeits-it"),
    pytest.param(True, U1, DEPOSIT * QTY, id="customer-after-refundable-deposit-gets-it-back"),
    pytest.param(False, ADMIN, DEPOSIT * QTY, id="admin-refunds-everything"),
])
async def test_cancel_after_the_deposit(client, db, redis, refundable, who, refunded):
    await make_product(client, **plan(deposit_refundable=refundable))
    order = await place(client)
    assert (await pay(client, order, "deposit", "DEP-1")).status_code == 201
    r = await client.delete(f"/api/preorder/{order['order_id']}", headers=who)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert r.json()["refunded"] == refunded
    assert await reserved(client) == 0
    assert await db.fetchval("SELECT COALESCE(sum(amount), 0) FROM refunds") == refunded
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_an_admin_cancel_of_a_paid_deposit_order_refunds_both_payments(client, db, redis, clock):
    await make_product(client, **plan())
    order = await place(client)
    assert (await pay(client, order, "deposit", "DEP-1")).status_code == 201
    clock.advance(HOUR + 1)
    assert (await pay(client, order, "balance", "BAL-1")).status_code == 201
    r = await client.delete(f"/api/preorder/{order['order_id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["refunded"] == DEPOSIT * QTY + order["balance_due"], r.text
    refunds = (await client.get(f"/api/preorder/{order['order_id']}/refunds", headers=ADMIN)).json()["items"]
    assert sorted(r["amount"] for r in refunds) == sorted([DEPOSIT * QTY, order["balance_due"]])
    events = (await client.get(f"/api/preorder/{order['order_id']}/events", headers=ADMIN)).json()["items"]
    assert [e["type"] for e in events][-3:] == ["cancelled", "refund_created", "refund_created"]
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_a_customer_cancel_before_the_deposit_refunds_nothing(client, db, redis):
    await make_product(client, **plan())
    order = await place(client)
    r = await client.delete(f"/api/preorder/{order['order_id']}", headers=U1)
    assert r.status_code == 200 and r.json()["refunded"] == 0
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0
    await assert_invariants(db, redis, created=[order["order_id"]])


async def test_another_customer_cannot_pay_or_see_payments(client, db):
    await make_product(client, **plan())
    order = await place(client)
    other = bearer("U2")
    assert (await pay(client, order, "deposit", "DEP-1", who=other)).status_code == 404
    assert (await client.get(f"/api/preorder/{order['order_id']}/payments", headers=other)).status_code == 404
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


@pytest.mark.parametrize("payer", ["customer", "admin"])  # an admin's payment is a transaction (with its audit row)
async def test_a_late_payment_racing_a_refund_paid_back_records_both_in_sequence(
        client, db, redis, app, clock, settings, payer):
    """Neither changes the order's status: the payment's statement waits for the order row the refund's
    transaction holds, then numbers its events after the refund's (it used to reuse its sequence number and
    answer 409 "reference already used")."""
    await make_product(client, **plan(deposit_window_seconds=60))
    order = await place(client)
    clock.advance(61)
    assert await app.state.orders.expire_due() == 1
    first = (await pay(client, order, "deposit", "DEP-LATE")).json()
    refund_id = first["refunds"][0]["refund_id"]
    order_id = uuid.UUID(order["order_id"])

    holder = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        async with holder.transaction():  # the admin's "refund paid back", not yet committed
            assert await repo.refund_succeeded(holder, refund_id, order_id, provider_reference="RF-1",
                                               actor="admin-1") is not None
            paying = asyncio.create_task(pay(client, order, "deposit", "DEP-LATE-2",
                                             who=ADMIN if payer == "admin" else U1))
            await eventually(lambda: _a_statement_waits_for_a_lock(db), within=10)
        second = await asyncio.wait_for(paying, 10)
    finally:
        await holder.close()

    assert second.status_code == 201, second.text
    assert second.json()["payment"]["outcome"] == "refunded"
    events = await db.fetch("SELECT sequence, type FROM order_events WHERE order_id = $1 ORDER BY sequence",
                            order_id)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events][-3:] == ["refund_succeeded", "payment_recorded", "refund_created"]
    await assert_invariants(db, redis, created=[order["order_id"]])


async def _a_statement_waits_for_a_lock(db: asyncpg.Connection) -> None:
    waiting = await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    assert waiting >= 1, "the payment is not waiting for the order row yet"
