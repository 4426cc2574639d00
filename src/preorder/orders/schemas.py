"""Order request and response models. Requests forbid unknown fields: no status, price or amount can be
smuggled into a create."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from preorder.types import Currency, MinorUnits, ProductId, UserId

Status = Literal["pending", "paid", "shipped", "completed", "cancelled"]
Reference = str


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
    status: Literal["paid", "shipped", "completed", "cancelled"]
    payment: Payment | None = Field(default=None, description="required to mark an order paid")
    reason: str | None = Field(default=None, min_length=1, max_length=200)


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
    pay_by: datetime
    created_at: datetime
    updated_at: datetime


class OrderPage(BaseModel):
    items: list[OrderOut]
    next_cursor: str | None


class EventOut(BaseModel):
    from_status: Status | None
    to_status: Status
    actor: str
    reason: str
    at: datetime


class EventList(BaseModel):
    order_id: uuid.UUID
    items: list[EventOut]
