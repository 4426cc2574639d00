"""A Hypothesis state machine over both payment plans: creates, deposit, balance and full payments (on time, early,
late, repeated), cancels by the customer or an admin, shipping, the sweeper's two deadlines and time moving on,
against an in-memory model; I1-I6 are checked after every step.

Time moves by the service's clock in steps of 1000 s: every deposit or payment window (600 s, 900 s) closes within
one step, and the balance window [3600 s, 7200 s) opens and closes between steps, so no deadline falls near the
moment a step is checked (the real seconds the test takes are far inside that margin)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, initialize, invariant, multiple, rule, run_state_machine_as_test

from preorder.settings import Settings
from tests.conftest import ADMIN, bearer
from tests.invariants import assert_invariants
from tests.test_stateful import ApiMachine

STEP = 1000
BALANCE_OPENS, BALANCE_CLOSES = 3600, 7200
# product -> plan; D keeps a customer's deposit on cancel, DR gives it back.
PRODUCTS: dict[str, dict[str, Any]] = {
    "F": {"price_amount": 500, "payment_window_seconds": 900},
    "D": {"price_amount": 1000, "payment_plan": "deposit", "deposit_amount": 100, "deposit_credit": 150,
          "deposit_window_seconds": 600},
    "DR": {"price_amount": 800, "payment_plan": "deposit", "deposit_amount": 200, "deposit_window_seconds": 600,
           "deposit_refundable": True},
}
STOCK = 5
USERS = ["U1", "U2"]
TOKENS = {u: bearer(u) for u in USERS}
CLOSED = ("cancelled", "forfeited")


@dataclass
class Order:
    order_id: str
    product_id: str
    user: str
    quantity: int
    status: str
    created_t: int
    payments: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # reference -> (kind, amount, outcome)

    @property
    def plan(self) -> str:
        return str(PRODUCTS[self.product_id].get("payment_plan", "full"))

    def due(self, kind: str) -> int:
        p = PRODUCTS[self.product_id]
        deposit = int(p.get("deposit_amount", 1))  # a full plan takes no deposit: any amount is refused
        if kind == "deposit":
            return deposit * self.quantity
        if kind == "balance":
            return (int(p["price_amount"]) - int(p.get("deposit_credit", deposit))) * self.quantity
        return int(p["price_amount"]) * self.quantity

    def pay_by(self) -> int:
        p = PRODUCTS[self.product_id]
        return self.created_t + int(p.get("deposit_window_seconds") or p["payment_window_seconds"])


class DepositsMachine(ApiMachine):
    orders = Bundle("orders")

    def __init__(self) -> None:
        self.t = 0  # seconds the clock has been moved
        self.model: dict[str, Order] = {}
        super().__init__()

    @initialize()
    def products(self) -> None:
        start = datetime.now(UTC)
        for pid, fields in PRODUCTS.items():
            body = {"id": pid, "name": pid, "currency": "USD", "total_stock": STOCK, **fields}
            if fields.get("payment_plan") == "deposit":
                body["balance_starts_at"] = (start + timedelta(seconds=BALANCE_OPENS)).isoformat()
                body["balance_ends_at"] = (start + timedelta(seconds=BALANCE_CLOSES)).isoformat()
            r = self.run(self.client.post("/api/products", json=body, headers=ADMIN))
            assert r.status_code == 201, r.text

    def reserved(self, pid: str) -> int:
        return sum(o.quantity for o in self.model.values() if o.product_id == pid and o.status not in CLOSED)

    # ---- rules ------------------------------------------------------------------------------------------

    @rule(target=orders, pid=st.sampled_from(sorted(PRODUCTS)), user=st.sampled_from(USERS), qty=st.integers(1, 2))
    def create(self, pid: str, user: str, qty: int) -> Any:
        r = self.run(self.client.post("/api/preorder", json={"product_id": pid, "quantity": qty},
                                      headers=TOKENS[user]))
        if self.reserved(pid) + qty > STOCK:
            assert r.status_code == 409 and r.json()["type"] == "/problems/out-of-stock", r.text
            return multiple()
        assert r.status_code == 201 and r.json()["status"] == "pending", r.text
        order = Order(r.json()["order_id"], pid, user, qty, "pending", self.t)
        self.model[order.order_id] = order
        return order.order_id

    @rule(oid=orders, kind=st.sampled_from(["deposit", "balance", "full"]), admin=st.booleans())
    def pay(self, oid: str, kind: str, admin: bool) -> None:
        o = self.model[oid]
        reference = f"PAY-{uuid.uuid4()}"
        body = {"kind": kind, "reference": reference, "amount": o.due(kind), "currency": "USD"}
        r = self.run(self.client.post(f"/api/preorder/{oid}/payments", json=body,
                                      headers=ADMIN if admin else TOKENS[o.user]))
        expected = self._payment_outcome(o, kind)
        if expected is None:
            assert r.status_code == 409, r.text
            return
        assert r.status_code == 201, r.text
        outcome, new_status = expected
        assert (r.json()["payment"]["outcome"], r.json()["order"]["status"]) == (outcome, new_status), r.text
        o.status = new_status
        o.payments[reference] = (kind, body["amount"], outcome)

    def _payment_outcome(self, o: Order, kind: str) -> tuple[str, str] | None:
        """(outcome, status after) as the rules say, or None for a 409 that records nothing."""
        if (kind == "full") != (o.plan == "full"):
            return None  # a kind the plan does not take
        early = self.t < BALANCE_OPENS or o.status == "pending"  # before the window, or before the deposit
        if kind == "balance" and o.status not in CLOSED and early:
            return None
        open_phase = {"full": "pending", "deposit": "pending", "balance": "deposit_paid"}[kind]
        on_time = self.t < o.pay_by() if kind != "balance" else self.t < BALANCE_CLOSES
        if o.status == open_phase and on_time:
            return "applied", {"full": "paid", "deposit": "deposit_paid", "balance": "paid"}[kind]
        return "refunded", o.status

    @rule(oid=orders)
    def repeat_a_payment(self, oid: str) -> None:
        """The same reference and body again: the same payment, nothing new recorded."""
        o = self.model[oid]
        if not o.payments:
            return
        reference, (kind, amount, outcome) = next(iter(o.payments.items()))
        body = {"kind": kind, "reference": reference, "amount": amount, "currency": "USD"}
        r = self.run(self.client.post(f"/api/preorder/{oid}/payments", json=body, headers=TOKENS[o.user]))
        assert r.status_code == 200 and r.json()["payment"]["outcome"] == outcome, r.text

    @rule(oid=orders, admin=st.booleans())
    def cancel(self, oid: str, admin: bool) -> None:
        o = self.model[oid]
        r = self.run(self.client.delete(f"/api/preorder/{oid}", headers=ADMIN if admin else TOKENS[o.user]))
        if o.status in ("shipped", "completed", "forfeited"):
            assert r.status_code == 409, r.text
            return
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        o.status = "cancelled"

    @rule(oid=orders)
    def refund_paid_back(self, oid: str) -> None:
        """An admin records that the provider paid a pending refund back (its event row is checked by I5)."""
        refunds = self.run(self.client.get(f"/api/preorder/{oid}/refunds", headers=ADMIN)).json()["items"]
        pending = [r for r in refunds if r["status"] == "pending"]
        if not pending:
            return
        path = f"/api/preorder/{oid}/refunds/{pending[0]['refund_id']}/succeeded"
        r = self.run(self.client.post(path, json={"provider_reference": f"RF-{uuid.uuid4()}"}, headers=ADMIN))
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text

    @rule(oid=orders)
    def ship(self, oid: str) -> None:
        o = self.model[oid]
        r = self.run(self.client.put(f"/api/preorder/{oid}", json={"status": "shipped"}, headers=ADMIN))
        if o.status != "paid":
            assert r.status_code == 409, r.text
            return
        assert r.status_code == 200, r.text
        o.status = "shipped"

    @rule()
    def time_passes(self) -> None:
        self.app.state.orders.clock.advance(STEP)
        self.t += STEP

    @rule()
    def sweep(self) -> None:
        expired = self.run(self.app.state.orders.expire_due())
        forfeited = self.run(self.app.state.orders.forfeit_all_due())  # the sweeper's round
        due = [o for o in self.model.values() if o.status == "pending" and self.t >= o.pay_by()]
        lapsed = [o for o in self.model.values() if o.status == "deposit_paid" and self.t >= BALANCE_CLOSES]
        assert (expired, forfeited) == (len(due), len(lapsed))
        for o in due:
            o.status = "cancelled"
        for o in lapsed:
            o.status = "forfeited"

    # ---- checked after every step -----------------------------------------------------------------------

    @invariant()
    def stored_as_modelled(self) -> None:
        rows = self.run(self.db.fetch("SELECT id::text, status FROM orders"))
        assert {r["id"]: r["status"] for r in rows} == {o.order_id: o.status for o in self.model.values()}
        recorded = self.run(self.db.fetch("SELECT reference, outcome FROM payments"))
        modelled = {ref: p[2] for o in self.model.values() for ref, p in o.payments.items()}
        assert {r["reference"]: r["outcome"] for r in recorded} == modelled

    @invariant()
    def i1_to_i6(self) -> None:
        for pid in PRODUCTS:
            assert self.run(self.client.get(f"/api/products/{pid}")).status_code == 200
        self.run(assert_invariants(self.db, self.redis, created=list(self.model)))


def test_both_plans_keep_the_invariants_through_any_sequence(settings: Settings) -> None:
    DepositsMachine.app_settings = settings
    run_state_machine_as_test(DepositsMachine, settings=hypothesis_settings(
        max_examples=15, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
