"""Order routes (seed-compatible): thin; rules live in service.py, SQL in repository.py."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from preorder import metrics
from preorder.audit.actor import client_address
from preorder.auth import BEARER_SECURITY, Admin, CurrentUser, Principal, bearer_principal
from preorder.errors import (
    OUTAGES,
    BadRequest,
    BalanceWindowNotOpen,
    Conflict,
    DomainError,
    Forbidden,
    IdempotencyInProgress,
    IdempotencyMismatch,
    InvalidTransition,
    MalformedBody,
    NotFound,
    OutOfStock,
    PayloadTooLarge,
    PaymentMismatch,
    PaymentReferenceUsed,
    PresaleClosed,
    RateLimited,
    Unauthorized,
    Unavailable,
    UnpaidLimitReached,
    UserLimitReached,
    ValidationFailed,
    render,
)
from preorder.orders import repository as repo
from preorder.orders.schemas import (
    EventList,
    EventOut,
    OrderCreate,
    OrderOut,
    OrderPage,
    OrderQuery,
    PaymentIn,
    PaymentList,
    PaymentResult,
    RefundDone,
    RefundList,
    RefundOut,
    StatusChange,
    order_json,
)
from preorder.orders.service import Orders, owner_filter, to_out
from preorder.responses import problems

router = APIRouter(prefix="/api/preorder", tags=["orders"])
_KEY_PATTERN = r"^[\x21-\x7e]+$"
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=128, pattern=_KEY_PATTERN)]
_KEY = re.compile(r"[\x21-\x7e]{1,128}")
# The hot route reads the header itself (a declared header parameter measured ~12 us of FastAPI's parameter
# solving per request) and documents it here, with the same schema the IdemKey parameter gets.
_KEY_DOC: dict[str, Any] = {"parameters": [{
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Retries with the same key and body make at most one order",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": _KEY_PATTERN},
}]}


def valid_idempotency_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None or valid_idempotency_key(key):
        return key
    raise RequestValidationError([{
        "type": "string_pattern_mismatch", "loc": ("header", "Idempotency-Key"), "input": key,
        "msg": "Idempotency-Key must be 1 to 128 printable ASCII characters without spaces",
    }])


async def get_orders(request: Request) -> Orders:
    orders: Orders = request.app.state.orders
    return orders


OrdersDep = Annotated[Orders, Depends(get_orders)]


async def owned_order(order_id: uuid.UUID, principal: CurrentUser, orders: OrdersDep) -> OrderOut:
    """The order if this principal may see it; another customer's order is 404, as if it did not exist."""
    return await orders.get(principal, order_id)


OwnedOrder = Annotated[OrderOut, Depends(owned_order)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=OrderOut, summary="Pre-order a product",
             openapi_extra={**BEARER_SECURITY, **_KEY_DOC},
             responses=problems(ValidationFailed, MalformedBody, BadRequest, Unauthorized, Forbidden, NotFound,
                                OutOfStock, UserLimitReached, UnpaidLimitReached, PresaleClosed, IdempotencyInProgress,
                                PaymentMismatch, PaymentReferenceUsed, InvalidTransition, PayloadTooLarge,
                                IdempotencyMismatch, RateLimited, Unavailable))
async def create_order(
    body: OrderCreate,
    principal: Annotated[Principal, Depends(bearer_principal)],
    request: Request,
) -> Response:
    """**Who may call:** a customer, for itself (`user_id` omitted or its own), or an admin for any customer.

    **Changes:** reserves `quantity` units of the product and writes a `pending` order that must be paid within
    the product's payment window (else it is cancelled and the stock comes back). With `payment`, pays it at once.
    Send an `Idempotency-Key` to retry safely: the same key and body answer the same order (`Idempotent-Replayed`).
    Refused without any change when the product is sold out, not on sale, past the per-customer limit, or the
    customer holds `PREORDER_MAX_UNPAID_PER_CUSTOMER` units unpaid already; 429 past the per-customer or
    per-address rates (`Retry-After`)."""
    # Ordinary creates are answered by orders.hot.HotCreate without the framework in the way; this route answers
    # the rest (bad input, a missing token), and documents the operation.
    orders: Orders = request.app.state.orders
    return await place_order(orders, principal, body, idem_key=idempotency_key(request),
                             client=client_address(request))


async def place_order(orders: Orders, principal: Principal, body: OrderCreate, *, idem_key: str | None,
                      client: str) -> Response:
    """The create and its answer, for the route and for HotCreate alike."""
    try:
        order, replayed = await orders.create(principal, body, idem_key=idem_key, client=client)
    except DomainError as refused:  # the 409s of a sold-out sale, rendered here: Starlette's handler lookup measured
        metrics.refused(refused.reason).inc()
        return render(refused)
    except OUTAGES:
        metrics.refused("unavailable").inc()
        raise
    return Created(order, replayed=replayed)


class Created(Response):
    """201 with the order, its Location and (for a replay) Idempotent-Replayed: the raw headers written at once
    rather than through Response's generic header building (measured on the create path)."""

    media_type = "application/json"

    def __init__(self, order: OrderOut, *, replayed: bool) -> None:
        self.status_code, self.background = 201, None
        self.body = order_json(order)
        self.raw_headers = [(b"location", f"/api/preorder/{order.order_id}".encode()),
                            (b"content-length", str(len(self.body)).encode()),
                            (b"content-type", b"application/json")]
        if replayed:
            self.raw_headers.insert(1, (b"idempotent-replayed", b"true"))


@router.get("", summary="List orders", responses=problems(ValidationFailed, BadRequest, Unauthorized, Forbidden,
                                                            Unavailable))
async def list_orders(principal: CurrentUser, orders: OrdersDep, query: Annotated[OrderQuery, Query()]) -> OrderPage:
    """**Who may call:** a customer (its own orders only; another `user_id` is 403) or an admin (all orders).

    **Changes:** nothing. Newest first, filtered by status, product and creation time; pass `next_cursor` back
    as `cursor` for the next page."""
    filters = repo.Filters(
        user_id=_visible_user(principal, query.user_id), status=query.status, product_id=query.product_id,
        created_from=query.created_from, created_to=query.created_to, before_id=_decode_cursor(query.cursor),
    )
    rows = await repo.page(orders.pool, filters, limit=query.limit + 1)
    items = [to_out(r) for r in rows[: query.limit]]
    more = len(rows) > query.limit
    return OrderPage(items=items, next_cursor=_encode_cursor(items[-1].order_id) if more else None)


def _visible_user(principal: Principal, asked: str | None) -> str | None:
    own = owner_filter(principal)
    if own is not None and asked not in (None, own):
        raise Forbidden("Customers can only list their own orders")
    return own or asked


def _encode_cursor(order_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(order_id.bytes).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> uuid.UUID | None:
    if cursor is None:
        return None
    try:
        return uuid.UUID(bytes=base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise BadRequest("Invalid cursor") from None


@router.get("/{order_id}", summary="Read one order", responses=problems(ValidationFailed, Unauthorized, NotFound,
                                                                         Unavailable))
async def get_order(order: OwnedOrder) -> OrderOut:
    """**Who may call:** the order's customer or an admin (another customer's order answers 404).

    **Changes:** nothing."""
    return order


@router.put("/{order_id}", summary="Pay, ship, complete or cancel an order",
            responses=problems(ValidationFailed, MalformedBody, BadRequest, Unauthorized, Forbidden, NotFound,
                               InvalidTransition, PaymentMismatch, PaymentReferenceUsed, PayloadTooLarge, Unavailable))
async def change_status(order: OwnedOrder, body: StatusChange, principal: CurrentUser, orders: OrdersDep,
                        request: Request) -> OrderOut:
    """**Who may call:** the order's customer to pay (`paid`, with the payment's reference and exact amount) or
    cancel it; an admin for any change (`shipped`, `completed` are admin-only).

    **Changes:** the order's status along `pending -> paid -> shipped -> completed` (or `cancelled` from
    `pending` or `paid`, which gives the stock back; a paid one gets a refund record) and one event row. An
    admin's change is written to the audit log with the client address."""
    return await orders.change_status(principal, order, body, client=client_address(request))


@router.delete("/{order_id}", summary="Cancel an order",
               responses=problems(ValidationFailed, Unauthorized, Forbidden, NotFound, InvalidTransition,
                                  Unavailable))
async def cancel_order(order: OwnedOrder, principal: CurrentUser, orders: OrdersDep, request: Request,
                       _: IdemKey = None) -> OrderOut:
    """**Who may call:** the order's customer or an admin.

    **Changes:** cancels a `pending` or `paid` order and gives its stock back (a paid one gets a refund record);
    cancelling a cancelled order answers the same and changes nothing. Shipped or completed orders: 409. An
    admin's cancel is written to the audit log."""
    return await orders.cancel(principal, order, None, client=client_address(request))


@router.get("/{order_id}/events", summary="Read an order's status history",
            responses=problems(ValidationFailed, Unauthorized, NotFound, Unavailable))
async def order_events(order: OwnedOrder, orders: OrdersDep) -> EventList:
    """**Who may call:** the order's customer or an admin.

    **Changes:** nothing. Every status change with who made it, why and when, oldest first."""
    rows = await repo.events(orders.pool, order.order_id)
    return EventList(order_id=order.order_id, items=[EventOut.model_validate(dict(r)) for r in rows])


@router.post("/{order_id}/payments", status_code=status.HTTP_201_CREATED, summary="Record a payment",
             responses={200: {"model": PaymentResult, "description": "A retry: this reference and body were "
                              "recorded before; the same result"},
                        **problems(ValidationFailed, MalformedBody, Unauthorized, NotFound, PaymentMismatch,
                                   BalanceWindowNotOpen, InvalidTransition, PaymentReferenceUsed, PayloadTooLarge,
                                   Unavailable)})
async def record_payment(order: OwnedOrder, body: PaymentIn, principal: CurrentUser, orders: OrdersDep,
                         request: Request, response: Response) -> PaymentResult:
    """**Who may call:** the order's customer, or an admin.

    **Changes:** records a payment the provider has taken: `deposit` then `balance` on a deposit-plan order,
    `full` otherwise. The amount must be exactly what that phase is due, in the order's currency (409
    otherwise, nothing recorded); a balance before the balance window opens is refused (409, with
    `balance_starts_at`). An applied payment moves the order on (`deposit_paid`, `paid`). A reference is
    recorded once: the same reference and body answer the same result (200); another body 409. A payment the
    order can no longer take (cancelled, forfeited, its window passed, already paid) is still recorded with
    outcome `refunded`, never re-opens the order, and gets a refund in status `pending`. One event per payment,
    status change and refund. An admin's payment is written to the audit log."""
    result, replayed = await orders.record_payment(principal, order, body, client=client_address(request))
    if replayed:
        response.status_code = status.HTTP_200_OK
    return result


@router.get("/{order_id}/payments", summary="List an order's payments",
            responses=problems(ValidationFailed, Unauthorized, NotFound, Unavailable))
async def list_payments(order: OwnedOrder, orders: OrdersDep) -> PaymentList:
    """**Who may call:** the order's customer or an admin.

    **Changes:** nothing. Every payment recorded for the order, oldest first, with its outcome (`applied` or
    `refunded`)."""
    return PaymentList(order_id=order.order_id, items=await orders.payments(order))


@router.get("/{order_id}/refunds", summary="List an order's refunds",
            responses=problems(ValidationFailed, Unauthorized, NotFound, Unavailable))
async def list_refunds(order: OwnedOrder, orders: OrdersDep) -> RefundList:
    """**Who may call:** the order's customer or an admin.

    **Changes:** nothing. Every refund the order owes or has paid back, oldest first: `pending` until an admin
    records the provider's refund reference, then `succeeded`."""
    return RefundList(order_id=order.order_id, items=await orders.refunds(order))


RefundId = Annotated[int, Path(ge=1, le=2**63 - 1, description="refund_id from GET /api/preorder/{id}/refunds")]


@router.post("/{order_id}/refunds/{refund_id}/succeeded", summary="Record that a refund was paid back",
             responses=problems(ValidationFailed, MalformedBody, Unauthorized, Forbidden, NotFound, Conflict,
                                Unavailable))
async def refund_succeeded(order_id: uuid.UUID, refund_id: RefundId, body: RefundDone, admin: Admin,
                           orders: OrdersDep, request: Request) -> RefundOut:
    """**Who may call:** admins.

    **Changes:** the refund becomes `succeeded` with the provider's refund reference, written to the audit log,
    and the order gets one `refund_succeeded` event (its status unchanged). A repeat with the same reference
    answers the same and writes nothing; another reference is a 409."""
    order = await orders.get(admin, order_id)
    return await orders.refund_succeeded(admin, order, refund_id, body.provider_reference,
                                         client=client_address(request))
