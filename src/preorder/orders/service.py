"""Order rules: create against a reservation, the status machine, idempotent retries, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from preorder import cache, metrics
from preorder.audit import repository as audit
from preorder.audit.actor import Actor
from preorder.auth import Principal
from preorder.cache import RedisClient
from preorder.clock import Clock
from preorder.db import PgConn, PgPool
from preorder.errors import (
    BadRequest,
    BalanceWindowNotOpen,
    Conflict,
    DomainError,
    Forbidden,
    IdempotencyInProgress,
    IdempotencyMismatch,
    InvalidTransition,
    NotFound,
    PaymentMismatch,
    PaymentReferenceUsed,
    Unavailable,
)
from preorder.ids import new_id
from preorder.orders import machine
from preorder.orders import repository as repo
from preorder.orders.group_commit import GroupCommit
from preorder.orders.schemas import (
    OrderCreate,
    OrderOut,
    Payment,
    PaymentIn,
    PaymentOut,
    PaymentResult,
    RefundOut,
    StatusChange,
)
from preorder.products import repository as products_repo
from preorder.settings import Settings
from preorder.status import CLOSED, Status
from preorder.stock.customers import Admission
from preorder.stock.keys import idempotency_marker
from preorder.stock.service import Ask, Reservation, Stock

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger("preorder.orders")


_ORDER_FIELDS = tuple(OrderOut.model_fields)
_ALL_SET = frozenset(_ORDER_FIELDS)


def to_out(row: asyncpg.Record) -> OrderOut:
    """What OrderOut.model_construct(**row) builds, for a row of our own schema (its types and constraints already
    hold, and it has every field, so there are no defaults to fill): the fields' dict set directly, as
    model_construct does, skipping its generic per-field work (measured 23 -> 4 us per create on this machine).
    tests/test_hot_create.py checks the two build equal models."""
    out = OrderOut.__new__(OrderOut)
    fields = {name: row[name] for name in _ORDER_FIELDS}
    fields["status"] = Status(fields["status"])  # the field's type: serialising a str there warns
    object.__setattr__(out, "__dict__", fields)
    object.__setattr__(out, "__pydantic_fields_set__", set(_ALL_SET))
    object.__setattr__(out, "__pydantic_extra__", None)
    object.__setattr__(out, "__pydantic_private__", None)
    return out


def owner_filter(principal: Principal) -> str | None:
    """Customers see only their own orders; admins see all."""
    return None if principal.is_admin else principal.sub


class Orders:
    def __init__(self, *, pool: PgPool, redis: RedisClient, stock: Stock, settings: Settings,
                 clock: Clock | None = None) -> None:
        self.pool, self.redis, self.stock, self.settings = pool, redis, stock, settings
        self.clock = clock or Clock()
        # Few batches in flight, so each is large: every batch takes a FOR KEY SHARE lock on its products' rows,
        # and on a hot product concurrent ones turn into MultiXact work in PostgreSQL (measured, README).
        self._group = GroupCommit(self._insert_many, max_inflight=min(settings.order_write_batches,
                                                                        settings.db_pool_max))

    # ---- create ---------------------------------------------------------------------------------------

    async def create(
        self, principal: Principal, body: OrderCreate, *, idem_key: str | None, client: str
    ) -> tuple[OrderOut, bool]:
        """Returns the order and whether it is a replay of an earlier request with the same key."""
        user_id = self._customer_for(principal, body)
        if body.quantity > self.settings.max_quantity:
            raise BadRequest(f"quantity must be at most {self.settings.max_quantity}")
        if idem_key is None:
            return await self._create(principal, user_id, body, client, None, None), False
        fingerprint = hashlib.sha256(orjson.dumps(body.model_dump(), option=orjson.OPT_SORT_KEYS)).hexdigest()
        replay = await self._replay(user_id, idem_key, fingerprint)
        if replay is not None:
            return replay, True
        marker = idempotency_marker(user_id, idem_key)
        # Milliseconds: with a sub-second write deadline, whole seconds would round down to an invalid 0.
        if not await self.redis.set(marker, fingerprint, nx=True, px=int(self.settings.write_deadline_s * 2000)):
            raise IdempotencyInProgress("Retry once the first request has finished")
        try:
            return await self._create(principal, user_id, body, client, idem_key, fingerprint), False
        except asyncpg.UniqueViolationError:
            # Another request with this key committed first (its marker was lost with Redis): replay it.
            replay = await self._replay(user_id, idem_key, fingerprint)
            if replay is None:
                raise
            return replay, True
        finally:
            # Best effort: the order is decided by now, so a Redis failure here must not turn it into a 503.
            # A marker left behind expires with its TTL (twice the write deadline).
            await _best_effort("idempotency_marker", self.redis.delete(marker))

    def _customer_for(self, principal: Principal, body: OrderCreate) -> str:
        user_id = body.user_id or principal.sub
        if user_id != principal.sub and not principal.is_admin:
            raise Forbidden("Customers can only order for themselves")
        return user_id

    async def _replay(self, user_id: str, key: str, fingerprint: str) -> OrderOut | None:
        found = await repo.find_idempotent(self.pool, user_id, key)
        if found is None:
            return None
        if found["fingerprint"] != fingerprint:
            raise IdempotencyMismatch("This Idempotency-Key was used with a different request body")
        row = await repo.get(self.pool, found["order_id"], user_id=None)
        assert row is not None
        return to_out(row)

    async def _create(
        self, principal: Principal, user_id: str, body: OrderCreate, client: str, key: str | None,
        fingerprint: str | None,
    ) -> OrderOut:
        self.stock.refuse_from_memory(body.product_id)  # most of a flash sale: answered before any other work
        if body.payment is not None:
            await self._check_payment_at_create(body.product_id, body.quantity, body.payment)
        order_id = new_id()
        ask = Ask(product_id=body.product_id, order_id=order_id, quantity=body.quantity, user_id=user_id,
                  client=client)
        held, admission = await self._reserve(ask)
        new = repo.NewOrder(
            order_id=order_id, product_id=body.product_id, user_id=user_id, quantity=body.quantity,
            epoch=held.epoch, deadline=self._deadline(held), now=self.clock.now(), idempotency_key=key,
            fingerprint=fingerprint,
            idempotency_ttl_s=self.settings.idempotency_ttl_s,
        )
        try:
            row = await self._write(new)
        except Exception:
            await admission.cancel()
            raise
        metrics.ORDERS_CREATED.inc()
        order = to_out(row)
        if body.payment is not None:
            order = await self._pay_at_once(order, body.payment, principal)
        return order

    async def _reserve(self, ask: Ask) -> tuple[Reservation, Admission]:
        """The customer's admission and the product's reservation, queued in the same loop turn: one pipeline,
        one round trip. Each side undoes itself if the other refuses; a customer's refusal wins (429 before 404)
        and comes before any PostgreSQL work (loading a product it has not seen)."""
        admission = self.stock.customers.admit(user_id=ask.user_id, address=ask.client, quantity=ask.quantity)
        try:
            held = await self.stock.reserve(ask, before_loading=admission.check)
        except Exception:
            await admission.check()
            await admission.cancel()
            raise
        try:
            await admission.check()
        except Exception:
            await self.stock.release(ask.product_id, ask.order_id)
            raise
        return held, admission

    def _deadline(self, held: Reservation) -> datetime:
        return datetime.fromtimestamp(held.reserved_at_ms / 1000, UTC) + timedelta(
            seconds=self.settings.write_deadline_s
        )

    async def _write(self, new: repo.NewOrder) -> asyncpg.Record:
        """Write the order; on a failure that surely wrote nothing, give the reservation back at once."""
        try:
            written = await self._insert(new)
        except asyncpg.UniqueViolationError:
            await self.stock.release(new.product_id, new.order_id)
            raise
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            # The server refused the statement, or we never got a connection: nothing was written.
            log.warning("order write failed, reservation released: %r", exc)
            await self.stock.release(new.product_id, new.order_id)
            raise Unavailable("The order store is unavailable; retry") from exc
        if written is repo.Refused.FENCED:
            await self.stock.release(new.product_id, new.order_id)
            raise Unavailable("Stock was rebuilt while ordering; retry")
        if written is repo.Refused.OVER_STOCK:
            # Redis granted units PostgreSQL has already sold: it went back in time. Rebuild it now, not at the
            # next reconcile pass; the client's retry is answered from the rebuilt counters.
            await self.stock.release(new.product_id, new.order_id)
            self.stock.rebuild_behind(new.product_id)
            raise Unavailable("Stock is being re-read from the order store; retry")
        return written

    async def _insert(self, new: repo.NewOrder) -> repo.Written:
        if new.idempotency_key is None:
            return await self._group.submit(new)
        async with self._connection() as conn:
            return await _insert_or_unknown(conn, new)

    async def _insert_many(self, news: list[repo.NewOrder]) -> dict[uuid.UUID, repo.Written]:
        async with self._connection() as conn:
            try:
                return await repo.insert_many(conn, news)
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError):
                raise Unavailable("The order store did not answer; retry") from None  # see _insert_or_unknown

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[PoolConnectionProxy[Any]]:
        # Failing here means no connection, so nothing was written. Waiting longer than the write deadline is
        # useless (the fence would refuse the write), and the pool's bound holds as everywhere.
        conn = await self.pool.acquire(timeout=min(self.settings.write_deadline_s, self.settings.db_acquire_timeout_s))
        try:
            yield conn
        finally:
            await _give_back(self.pool, conn)

    async def _check_payment_at_create(self, product_id: str, quantity: int, payment: Payment) -> None:
        """Refuse a wrong payment before anything is reserved or written (one extra read, only with a payment)."""
        product = await products_repo.get(self.pool, product_id)
        if product is None:
            raise NotFound(f"Unknown product {product_id}")
        # A deposit-plan order paid at creation pays its deposit.
        per_unit = product["deposit_amount"] if product["payment_plan"] == "deposit" else product["price_amount"]
        _match(payment, amount_due=per_unit * quantity, currency=product["currency"])

    async def _pay_at_once(self, order: OrderOut, payment: Payment, principal: Principal) -> OrderOut:
        """The payment sent with the create, recorded as made by whoever created the order (customer or admin).
        Refused by the rules (its reference already used): the new order is cancelled and the refusal answered.
        Any other failure (the store unreachable) is raised as it is: the order stays pending, and if the
        payment was not recorded, the sweeper cancels it at its deadline."""
        kind = "deposit" if order.payment_plan == "deposit" else "full"
        body = PaymentIn(kind=kind, reference=payment.reference, amount=payment.amount,
                         currency=payment.currency or order.currency)
        try:
            return (await self._apply(principal, order, body, late_ok=False)).order
        except DomainError:
            await self.change_status(principal, order, StatusChange(status=Status.CANCELLED,
                                                                    reason="payment_refused"))
            raise

    # ---- status machine -------------------------------------------------------------------------------

    async def get(self, principal: Principal, order_id: uuid.UUID) -> OrderOut:
        row = await repo.get(self.pool, order_id, user_id=owner_filter(principal))
        if row is None:
            raise NotFound(f"No order {order_id}")
        return to_out(row)

    async def change_status(self, principal: Principal, order: OrderOut, change: StatusChange, *,
                            client: str = "service") -> OrderOut:
        """An admin's change is written to the audit log in the same transaction, with the client address."""
        if not machine.may_ever(principal, change.status):
            raise Forbidden(f"Only an admin may mark an order {change.status}")
        rule = machine.rule_for(order.status, change.status)
        if rule is None:
            raise InvalidTransition(f"An order can't go from {order.status} to {change.status}",
                                    current=order.status)
        if not machine.may(principal, rule):
            raise Forbidden(f"Only an admin may mark an order {change.status}")
        if change.status == Status.PAID:
            return await self._put_paid(principal, order, change, client=client)
        row = await self._transition(principal, order, change, client=client)
        if row is None:  # lost a race: say to what
            current = await self.get(principal, order.order_id)
            raise InvalidTransition(f"The order is {current.status} now", current=current.status)
        metrics.status_changed(order.status, change.status).inc()
        await self._left(order, rule)
        return to_out(row)

    async def _left(self, order: OrderOut, rule: machine.Rule) -> None:
        """After the order left its status: the customer's unpaid count, and the stock its rule says. The change
        is committed: these Redis steps are best effort (the reconciler settles a hold, the unpaid recount a
        customer's count, when one fails here)."""
        if order.status == Status.PENDING:  # no longer unpaid: its units leave the customer's unpaid count
            await _best_effort("unpaid", self.stock.customers.give_back(order.user_id, order.quantity))
        if rule.stock == "release":
            await _best_effort("release", self.stock.release(order.product_id, order.order_id))
        elif rule.stock == "drop":
            await _best_effort("drop", self.stock.drop(order.product_id, order.order_id))

    async def _transition(self, principal: Principal, order: OrderOut, change: StatusChange, *, client: str
                          ) -> asyncpg.Record | None:
        cancel = change.status == Status.CANCELLED
        record = repo.Change(
            order_id=order.order_id, frm=Status(order.status), to=change.status, actor=principal.sub,
            reason=change.reason or _DEFAULT_REASON[change.status],
            cancelled_by=("admin" if principal.is_admin else "customer") if cancel else None,
        )
        if not principal.is_admin:
            return await repo.transition(self.pool, record)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await repo.transition(conn, record)
            if row is not None:
                await audit.record(conn, Actor(principal, client).did(
                    f"order.{change.status}", str(order.order_id), before={"status": order.status},
                    after={"status": change.status, "reason": record.reason, "refunded": row["refunded"]}))
            return row

    async def _put_paid(self, principal: Principal, order: OrderOut, change: StatusChange, *, client: str
                        ) -> OrderOut:
        """PUT {status: paid, payment}: a full payment of a full-plan order, refused (409) once its window closed."""
        if order.payment_plan == "deposit":
            raise InvalidTransition("A deposit-plan order is paid through POST /api/preorder/{id}/payments",
                                    current=order.status)
        payment = change.payment
        if payment is None:
            raise BadRequest("Marking an order paid needs payment.reference and payment.amount")
        body = PaymentIn(kind="full", reference=payment.reference, amount=payment.amount,
                         currency=payment.currency or order.currency)
        return (await self._apply(principal, order, body, late_ok=False, client=client)).order

    # ---- payments and refunds -------------------------------------------------------------------------

    async def record_payment(
        self, principal: Principal, order: OrderOut, body: PaymentIn, *, client: str = "service"
    ) -> tuple[PaymentResult, bool]:
        """POST /payments: returns the result and whether it is a replay of the same reference and body."""
        known = await repo.payment_by_reference(self.pool, body.reference)
        if known is not None:
            return await self._replayed(principal, known, order, body), True
        return await self._apply(principal, order, body, late_ok=True, client=client), False

    async def _replayed(self, principal: Principal, known: asyncpg.Record, order: OrderOut,
                        body: PaymentIn) -> PaymentResult:
        same = (known["order_id"], known["kind"], known["amount"], known["currency"]) == (
            order.order_id, body.kind, body.amount, body.currency)
        if not same:
            raise PaymentReferenceUsed("This payment reference was recorded with another order or body")
        return await self._result(principal, known)

    async def _result(self, principal: Principal, payment: asyncpg.Record) -> PaymentResult:
        refunds = await repo.refunds(self.pool, payment["order_id"], payment_id=payment["payment_id"])
        return PaymentResult(payment=PaymentOut(**dict(payment)),
                             order=await self.get(principal, payment["order_id"]),
                             refunds=[RefundOut(**dict(r)) for r in refunds])

    async def _apply(self, principal: Principal, order: OrderOut, body: PaymentIn, *, late_ok: bool,
                     client: str = "service") -> PaymentResult:
        """Apply the payment, or (late_ok) record it with a refund when the order can no longer take it. A race
        lost to another change of the order is retried against the order as it is now."""
        frm, to = _phase(order, body)
        _match(body, amount_due=_due(order, body.kind), currency=order.currency)
        for _ in range(5):
            now = self.clock.now()
            _check_open(order, body, now=now, late_ok=late_ok)
            new = repo.NewPayment(
                order_id=order.order_id, kind=body.kind, reference=body.reference, amount=body.amount,
                currency=body.currency, actor=principal.sub, frm=frm, to=to, now=now, seen=order.updated_at,
                late_ok=late_ok)
            row = await self._pay(principal, new, client=client)
            if row["applied"]:
                metrics.status_changed(frm, to).inc()
            if row["applied"] and frm == Status.PENDING:  # no longer unpaid: leaves the customer's unpaid count
                await _best_effort("unpaid", self.stock.customers.give_back(order.user_id, order.quantity))
            if row["payment_id"] is not None:
                payment = await repo.payment_by_reference(self.pool, body.reference)
                assert payment is not None
                return await self._result(principal, payment)
            current = await self.get(principal, order.order_id)
            if not late_ok:
                if current.status == order.status == Status.PENDING:
                    raise InvalidTransition("The payment window has closed", current=Status.PENDING)
                raise InvalidTransition(f"The order is {current.status} now", current=current.status)
            order = current
        raise Unavailable("The order kept changing while the payment was recorded; retry")

    async def _pay(self, principal: Principal, new: repo.NewPayment, *, client: str) -> asyncpg.Record:
        """One statement; an admin's payment is written to the audit log in the same transaction."""
        try:
            if not principal.is_admin:
                return await repo.pay(self.pool, new, reason=_DEFAULT_REASON[new.to])
            async with self.pool.acquire() as conn, conn.transaction():
                row = await repo.pay(conn, new, reason=_DEFAULT_REASON[new.to])
                if row["payment_id"] is not None:
                    await audit.record(conn, Actor(principal, client).did(
                        "order.payment", str(new.order_id), after={
                            "kind": new.kind, "reference": new.reference, "amount": new.amount,
                            "outcome": "applied" if row["applied"] else "refunded"}))
                return row
        except asyncpg.UniqueViolationError:
            raise PaymentReferenceUsed("This payment reference has already paid an order") from None

    async def payments(self, order: OrderOut) -> list[PaymentOut]:
        return [PaymentOut(**dict(r)) for r in await repo.payments(self.pool, order.order_id)]

    async def refunds(self, order: OrderOut) -> list[RefundOut]:
        return [RefundOut(**dict(r)) for r in await repo.refunds(self.pool, order.order_id)]

    async def refund_succeeded(self, admin: Principal, order: OrderOut, refund_id: int, provider_reference: str, *,
                               client: str = "service") -> RefundOut:
        """Admin: the provider has paid the refund back. Once (written to the audit log in the same transaction);
        a repeat with the same reference answers the same."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await repo.refund_succeeded(conn, refund_id, order.order_id, provider_reference=provider_reference,
                                           actor=admin.sub)
            if row is not None:
                await audit.record(conn, Actor(admin, client).did(
                    "order.refund_succeeded", str(order.order_id), before={"refund_id": refund_id, "status": "pending"},
                    after={"status": "succeeded", "provider_reference": provider_reference, "amount": row["amount"]}))
        if row is None:
            row = await repo.refund(self.pool, refund_id)
            if row is None or row["order_id"] != order.order_id:
                raise NotFound(f"No refund {refund_id} for order {order.order_id}")
            if row["provider_reference"] != provider_reference:
                raise Conflict(f"Refund {refund_id} already succeeded with another provider reference",
                               provider_reference=row["provider_reference"])
        return RefundOut(**dict(row))

    async def cancel(self, principal: Principal, order: OrderOut, reason: str | None, *, client: str = "service"
                     ) -> OrderOut:
        """DELETE: cancelling a cancelled order answers the same and releases nothing."""
        if order.status == Status.CANCELLED:
            return order
        try:
            return await self.change_status(principal, order, StatusChange(status=Status.CANCELLED, reason=reason),
                                            client=client)
        except InvalidTransition as lost:
            # The sweeper or another DELETE cancelled it first (and released it): the same answer as a repeat.
            if lost.extra.get("current") != Status.CANCELLED:
                raise
            return await self.get(principal, order.order_id)

    async def expire_due(self, *, limit: int = 1000) -> int:
        """Cancel unpaid orders past their window (safe to run in every process at once)."""
        rows = await repo.expire_due(self.pool, limit=limit, now=self.clock.now())
        if rows:
            metrics.status_changed("pending", "cancelled").inc(len(rows))
            metrics.SWEEPER_EXPIRED.inc(len(rows))
        given: dict[str, int] = defaultdict(int)
        for r in rows:
            given[r["user_id"]] += r["quantity"]
        # Each customer's units in one call, the customers concurrently: with Redis down the round fails after one
        # timeout, not one per order (the unpaid recount mends what a failed round left counted).
        await asyncio.gather(*(self.stock.customers.give_back(user, n) for user, n in given.items()))
        await self._release_all(rows)
        return len(rows)

    async def expire_all_due(self, *, batch: int = 1000, budget_s: float = 30.0) -> int:
        """The sweeper's round of payment timeouts: see _all_due."""
        return await _all_due(self.expire_due, batch=batch, budget_s=budget_s)

    async def forfeit_due(self, *, limit: int = 1000) -> int:
        """Forfeit deposit-paid orders whose balance window closed (safe to run in every process at once).
        A crash between the statement and the releases leaves holds the reconciler settles (forfeited orders
        are in its index of settled orders)."""
        rows = await repo.forfeit_due(self.pool, limit=limit, now=self.clock.now())
        if rows:
            metrics.status_changed(Status.DEPOSIT_PAID, Status.FORFEITED).inc(len(rows))
        await self._release_all(rows)
        return len(rows)

    async def forfeit_all_due(self, *, batch: int = 1000, budget_s: float = 30.0) -> int:
        """The sweeper's round of balance windows: see _all_due."""
        return await _all_due(self.forfeit_due, batch=batch, budget_s=budget_s)

    async def _release_all(self, rows: list[asyncpg.Record]) -> None:
        """One release_many call per product (and per chunk of its orders), the products concurrently."""
        by_product: dict[str, list[uuid.UUID]] = defaultdict(list)
        for r in rows:
            by_product[r["product_id"]].append(r["id"])
        await asyncio.gather(*(self.stock.release_many(p, ids) for p, ids in by_product.items()))

    async def drain(self) -> None:
        """Shutdown: write every order row still queued for group commit."""
        await self._group.drain()


async def _all_due(step: Callable[..., Awaitable[int]], *, batch: int, budget_s: float) -> int:
    """A sweeper round: `step` batch after batch until one comes back short (nothing more is due) or `budget_s`
    has passed (the rest is the next round's), so a deadline passing on 100,000 orders is done in one round, not
    one batch per sweep interval. Each batch is one statement and its own commit."""
    deadline = time.monotonic() + budget_s
    total = 0
    while True:
        n = await step(limit=batch)
        total += n
        if n < batch or time.monotonic() >= deadline:
            return total


async def _insert_or_unknown(conn: PgConn, new: repo.NewOrder) -> repo.Written:
    try:
        return await repo.insert(conn, new)
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError):
        # Lost mid-statement: it may or may not have committed. The hold stays for the reconciler,
        # which frees it only after the write deadline has passed and if no order row exists.
        raise Unavailable("The order store did not answer; retry") from None


async def _best_effort(step: str, settling: Awaitable[Any]) -> None:
    """A Redis step after a committed change: its failure is logged and counted, never raised (the order's
    answer is already decided); the idempotency marker's TTL or the reconciler finishes the job."""
    try:
        await settling
    except cache.UNAVAILABLE as exc:
        metrics.side_effect_failed(step).inc()
        log.warning("redis step %s failed after the commit; left to the reconciler or the TTL", step, exc_info=exc)


async def _give_back(pool: PgPool, conn: PoolConnectionProxy[Any]) -> None:
    # The write's outcome is decided by now. A connection that breaks on its way back to the pool (the pool
    # then discards it) must not make _write release the reservation of an order that was stored.
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        await pool.release(conn)


_DEFAULT_REASON = {Status.PAID: "payment_confirmed", Status.DEPOSIT_PAID: "deposit_confirmed",
                   Status.SHIPPED: "shipped", Status.COMPLETED: "completed", Status.CANCELLED: "cancelled_by_request"}
# The status a payment of each kind moves an order from, and to.
_PHASES = {"full": (Status.PENDING, Status.PAID), "deposit": (Status.PENDING, Status.DEPOSIT_PAID),
           "balance": (Status.DEPOSIT_PAID, Status.PAID)}


def _phase(order: OrderOut, body: PaymentIn) -> tuple[Status, Status]:
    takes = ("full",) if order.payment_plan == "full" else ("deposit", "balance")
    if body.kind not in takes:
        raise InvalidTransition(f"A {order.payment_plan}-plan order takes {' and '.join(takes)} payments",
                                current=order.status)
    return _PHASES[body.kind]


def _due(order: OrderOut, kind: str) -> int:
    if kind == "deposit":
        return order.deposit_due
    if kind == "balance":
        assert order.balance_due is not None
        return order.balance_due
    return order.amount_due


def _check_open(order: OrderOut, body: PaymentIn, *, now: datetime, late_ok: bool) -> None:
    """Refusals that record nothing: a balance before its window opens, or before the deposit. A payment for an
    order that can no longer take it (closed, expired, already paid) is not refused here: it is recorded and
    refunded (late_ok), or refused by the conditional write."""
    if body.kind != "balance" or order.status in CLOSED:
        return
    assert order.balance_starts_at is not None
    if now < order.balance_starts_at:
        raise BalanceWindowNotOpen(f"The balance can be paid from {order.balance_starts_at.isoformat()}",
                                   balance_starts_at=order.balance_starts_at.isoformat())
    if order.status == Status.PENDING and late_ok:
        raise InvalidTransition("Pay the deposit before the balance", current=order.status)


def _match(payment: Payment | PaymentIn, *, amount_due: int, currency: str) -> None:
    if payment.amount != amount_due or (payment.currency and payment.currency != currency):
        raise PaymentMismatch(f"Payment must be exactly {amount_due} {currency}",
                              amount_due=amount_due, currency=currency)
