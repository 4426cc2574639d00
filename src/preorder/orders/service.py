"""Order rules: create against a reservation, the status machine, idempotent retries, expiry."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from preorder.audit import repository as audit
from preorder.audit.actor import Actor
from preorder.auth import Principal
from preorder.cache import RedisClient
from preorder.db import PgConn, PgPool
from preorder.errors import (
    BadRequest,
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
from preorder.orders.schemas import OrderCreate, OrderOut, Payment, StatusChange
from preorder.products import repository as products_repo
from preorder.settings import Settings
from preorder.stock.customers import Admission
from preorder.stock.keys import idempotency_marker
from preorder.stock.service import Ask, Reservation, Stock

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger("preorder.orders")


def to_out(row: asyncpg.Record) -> OrderOut:
    # model_construct: the row comes from our own schema, whose types and constraints already hold.
    return OrderOut.model_construct(**dict(row))


def owner_filter(principal: Principal) -> str | None:
    """Customers see only their own orders; admins see all."""
    return None if principal.is_admin else principal.sub


class Orders:
    def __init__(self, *, pool: PgPool, redis: RedisClient, stock: Stock, settings: Settings) -> None:
        self.pool, self.redis, self.stock, self.settings = pool, redis, stock, settings
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
            return await self._create(user_id, body, client, None, None), False
        fingerprint = hashlib.sha256(orjson.dumps(body.model_dump(), option=orjson.OPT_SORT_KEYS)).hexdigest()
        replay = await self._replay(user_id, idem_key, fingerprint)
        if replay is not None:
            return replay, True
        marker = idempotency_marker(user_id, idem_key)
        # Milliseconds: with a sub-second write deadline, whole seconds would round down to an invalid 0.
        if not await self.redis.set(marker, fingerprint, nx=True, px=int(self.settings.write_deadline_s * 2000)):
            raise IdempotencyInProgress("Retry once the first request has finished")
        try:
            return await self._create(user_id, body, client, idem_key, fingerprint), False
        except asyncpg.UniqueViolationError:
            # Another request with this key committed first (its marker was lost with Redis): replay it.
            replay = await self._replay(user_id, idem_key, fingerprint)
            if replay is None:
                raise
            return replay, True
        finally:
            await self.redis.delete(marker)

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
        self, user_id: str, body: OrderCreate, client: str, key: str | None, fingerprint: str | None
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
            epoch=held.epoch, deadline=self._deadline(held), idempotency_key=key, fingerprint=fingerprint,
            idempotency_ttl_s=self.settings.idempotency_ttl_s,
        )
        try:
            row = await self._write(new)
        except Exception:
            await admission.cancel()
            raise
        order = to_out(row)
        if body.payment is not None:
            order = await self._pay_at_once(order, body.payment, user_id)
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
        # useless (the fence would refuse the write) and, with PostgreSQL unreachable, would queue without bound.
        conn = await self.pool.acquire(timeout=self.settings.write_deadline_s)
        try:
            yield conn
        finally:
            await _give_back(self.pool, conn)

    async def _check_payment_at_create(self, product_id: str, quantity: int, payment: Payment) -> None:
        """Refuse a wrong payment before anything is reserved or written (one extra read, only with a payment)."""
        product = await products_repo.get(self.pool, product_id)
        if product is None:
            raise NotFound(f"Unknown product {product_id}")
        _match(payment, amount_due=product["price_amount"] * quantity, currency=product["currency"])

    async def _pay_at_once(self, order: OrderOut, payment: Payment, user_id: str) -> OrderOut:
        actor = Principal(sub=user_id, role="customer")
        try:
            return await self.change_status(actor, order, StatusChange(status="paid", payment=payment))
        except Exception:
            await self.change_status(actor, order, StatusChange(status="cancelled", reason="payment_refused"))
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
        row = await self._transition(principal, order, change, client=client)
        if row is None:  # lost a race, or the payment window closed: say which
            current = await self.get(principal, order.order_id)
            if current.status == order.status == "pending" and change.status == "paid":
                raise InvalidTransition("The payment window has closed", current="pending")
            raise InvalidTransition(f"The order is {current.status} now", current=current.status)
        if order.status == "pending":  # no longer unpaid: its units leave the customer's unpaid count
            await self.stock.customers.give_back(order.user_id, order.quantity)
        if rule.stock == "release":
            await self.stock.release(order.product_id, order.order_id)
        elif rule.stock == "drop":
            await self.stock.drop(order.product_id, order.order_id)
        return to_out(row)

    async def _transition(self, principal: Principal, order: OrderOut, change: StatusChange, *, client: str
                          ) -> asyncpg.Record | None:
        paid = _check_payment(order, change) if change.status == "paid" else None
        record = repo.Change(
            order_id=order.order_id, frm=order.status, to=change.status, actor=principal.sub,
            reason=change.reason or _DEFAULT_REASON[change.status],
            payment_reference=paid.reference if paid else None, amount_paid=paid.amount if paid else None,
        )
        try:
            if not principal.is_admin:
                return await repo.transition(self.pool, record)
            async with self.pool.acquire() as conn, conn.transaction():
                row = await repo.transition(conn, record)
                if row is not None:
                    await audit.record(conn, Actor(principal, client).did(
                        f"order.{change.status}", str(order.order_id), before={"status": order.status},
                        after={"status": change.status, "reason": record.reason, "refund": order.status == "paid"
                               and change.status == "cancelled"}))
                return row
        except asyncpg.UniqueViolationError:
            raise PaymentReferenceUsed("This payment reference has already paid an order") from None

    async def cancel(self, principal: Principal, order: OrderOut, reason: str | None, *, client: str = "service"
                     ) -> OrderOut:
        """DELETE: cancelling a cancelled order answers the same and releases nothing."""
        if order.status == "cancelled":
            return order
        try:
            return await self.change_status(principal, order, StatusChange(status="cancelled", reason=reason),
                                            client=client)
        except InvalidTransition as lost:
            # The sweeper or another DELETE cancelled it first (and released it): the same answer as a repeat.
            if lost.extra.get("current") != "cancelled":
                raise
            return await self.get(principal, order.order_id)

    async def expire_due(self, *, limit: int = 500) -> int:
        """Cancel unpaid orders past their window (safe to run in every process at once)."""
        rows = await repo.expire_due(self.pool, limit=limit)
        for r in rows:
            await self.stock.customers.give_back(r["user_id"], r["quantity"])
            await self.stock.release(r["product_id"], r["id"])
        return len(rows)


async def _insert_or_unknown(conn: PgConn, new: repo.NewOrder) -> repo.Written:
    try:
        return await repo.insert(conn, new)
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError):
        # Lost mid-statement: it may or may not have committed. The hold stays for the reconciler,
        # which frees it only after the write deadline has passed and if no order row exists.
        raise Unavailable("The order store did not answer; retry") from None


async def _give_back(pool: PgPool, conn: PoolConnectionProxy[Any]) -> None:
    # The write's outcome is decided by now. A connection that breaks on its way back to the pool (the pool
    # then discards it) must not make _write release the reservation of an order that was stored.
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        await pool.release(conn)


_DEFAULT_REASON = {"paid": "payment_confirmed", "shipped": "shipped", "completed": "completed",
                   "cancelled": "cancelled_by_request"}


def _check_payment(order: OrderOut, change: StatusChange) -> Payment:
    payment = change.payment
    if payment is None:
        raise BadRequest("Marking an order paid needs payment.reference and payment.amount")
    _match(payment, amount_due=order.amount_due, currency=order.currency)
    return payment


def _match(payment: Payment, *, amount_due: int, currency: str) -> None:
    if payment.amount != amount_due or (payment.currency and payment.currency != currency):
        raise PaymentMismatch(f"Payment must be exactly {amount_due} {currency}",
                              amount_due=amount_due, currency=currency)
