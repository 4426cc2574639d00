"""Order request and response models. Requests forbid unknown fields: no status, price or amount can be
smuggled into a create."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from preorder.status import Status
from preorder.types import Currency, MinorUnits, ProductId, Text, Timestamp, UserId

Reference = str
PaymentKind = Literal["deposit", "balance", "full"]


class Payment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str = Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$", examples=["PAY-2024-0001"])
    amount: MinorUnits
    currency: Currency | None = None


class OrderCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"product_id": "P1001", "quantity": 2, "user_id": "U123"}]},
    )
    product_id: ProductId
    quantity: StrictInt = Field(ge=1, le=1_000_000, description="capped further by PREORDER_MAX_QUANTITY")
    user_id: UserId | None = Field(default=None, description="defaults to the token's subject")
    payment: Payment | None = None


class StatusChange(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"status": "paid", "payment": {"reference": "PAY-1", "amount": 5998}}]},
    )
    status: Literal[Status.PAID, Status.SHIPPED, Status.COMPLETED, Status.CANCELLED]
    payment: Payment | None = Field(default=None, description="required to mark an order paid")
    reason: Text | None = None


class OrderQuery(BaseModel):
    """GET /api/preorder filters. Unknown parameters are refused like unknown body fields: a misspelt
    filter (`?userid=`) must not quietly widen the listing."""

    model_config = ConfigDict(extra="forbid")
    user_id: UserId | None = Field(default=None, description="admins only, or your own")
    status: Status | None = None
    product_id: ProductId | None = None
    created_from: Timestamp | None = None
    created_to: Timestamp | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=64, description="next_cursor of the previous page")

    @model_validator(mode="after")
    def _range_ordered(self) -> OrderQuery:
        if self.created_from and self.created_to and self.created_to <= self.created_from:
            raise ValueError("created_to must be after created_from")
        return self


class OrderOut(BaseModel):
    order_id: uuid.UUID
    product_id: str
    user_id: str
    quantity: int
    status: Status
    amount_due: int
    currency: str
    payment_reference: str | None
    amount_paid: int | None
    pay_by: datetime = Field(description="pay (the deposit, on a deposit plan) before this, or be cancelled")
    created_at: datetime
    updated_at: datetime
    # Defaults: events written before deposit plans existed (migration 0007) carry snapshots without these.
    payment_plan: Literal["full", "deposit"] = "full"
    deposit_due: int = 0
    balance_due: int | None = Field(default=None, description="amount_due - deposit credit x quantity")
    balance_starts_at: datetime | None = None
    balance_ends_at: datetime | None = Field(default=None, description="pay the balance before this, or forfeit")
    paid: int = 0
    refunded: int = 0


class PaymentIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"kind": "deposit", "reference": "PAY-D-1", "amount": 20000, "currency": "USD"},
            {"kind": "balance", "reference": "PAY-B-1", "amount": 70000, "currency": "USD"},
            {"kind": "full", "reference": "PAY-1", "amount": 5998, "currency": "USD"},
        ]},
    )
    kind: PaymentKind = Field(description="deposit and balance for a deposit-plan order; full otherwise")
    reference: str = Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$",
                           description="the payment provider's reference; recorded once")
    amount: MinorUnits
    currency: Currency


class PaymentOut(BaseModel):
    payment_id: int
    order_id: uuid.UUID
    kind: PaymentKind
    reference: str
    amount: int
    currency: str
    outcome: Literal["applied", "refunded"] = Field(
        description="applied: it moved the order on; refunded: the order could no longer take it")
    actor: str
    created_at: datetime


class RefundOut(BaseModel):
    refund_id: int
    order_id: uuid.UUID
    payment_id: int | None
    amount: int
    currency: str
    reason: str
    status: Literal["pending", "succeeded"]
    provider_reference: str | None
    created_at: datetime
    succeeded_at: datetime | None


class PaymentResult(BaseModel):
    payment: PaymentOut
    order: OrderOut
    refunds: list[RefundOut] = Field(description="the refund this payment caused, if the order could not take it")


class PaymentList(BaseModel):
    order_id: uuid.UUID
    items: list[PaymentOut]


class RefundList(BaseModel):
    order_id: uuid.UUID
    items: list[RefundOut]


class RefundDone(BaseModel):
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"provider_reference": "RF-2026-0001"}]})
    provider_reference: str = Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$",
                                    description="the payment provider's reference for the refund it made")


class OrderPage(BaseModel):
    items: list[OrderOut]
    next_cursor: str | None


class EventOut(BaseModel):
    type: str = Field(description="created, a status (paid, forfeited...), payment_recorded, refund_created or "
                                  "refund_succeeded")
    from_status: Status | None
    to_status: Status
    actor: str
    reason: str
    at: datetime


class EventList(BaseModel):
    order_id: uuid.UUID
    items: list[EventOut]


def order_json(order: OrderOut) -> bytes:
    """The hot path's encoder: orjson straight from the model's fields, the same JSON FastAPI would write
    through the response model, without validating our own output again (measured on POST /api/preorder)."""
    return orjson.dumps(order.__dict__, default=str, option=orjson.OPT_UTC_Z)  # str: asyncpg's own UUID type
