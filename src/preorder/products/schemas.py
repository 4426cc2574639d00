"""Product request and response models."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from preorder.types import Currency, MinorUnits, ProductId, Text, Timestamp

Stock = Annotated[StrictInt, Field(ge=0, le=10**9)]
PerUserLimit = Annotated[StrictInt, Field(ge=1, le=10**6)]
PaymentWindow = Annotated[StrictInt, Field(ge=1, le=30 * 86_400, description="seconds to pay before cancelled")]
DepositWindow = Annotated[StrictInt, Field(ge=1, le=30 * 86_400, description="seconds to pay the deposit")]
PaymentPlan = Literal["full", "deposit"]
Unset = SkipJsonSchema[None]  # the field may be omitted, but the document does not offer null


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _window_ordered(self) -> _Rules:
        starts, ends = getattr(self, "starts_at", None), getattr(self, "ends_at", None)
        if starts and ends and ends <= starts:
            raise ValueError("ends_at must be after starts_at")
        return self


class ProductCreate(_Rules):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "id": "P1001", "name": "Console X (pre-order)", "price_amount": 2999, "currency": "USD", "total_stock": 1000,
        "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2026-12-08T09:00:00Z", "per_user_limit": 2,
        "payment_window_seconds": 900}, {
        "id": "P2001", "name": "Console Y (deposit pre-order)", "price_amount": 50000, "currency": "USD",
        "total_stock": 1000, "payment_plan": "deposit", "deposit_amount": 10000, "deposit_credit": 15000,
        "balance_starts_at": "2026-12-10T00:00:00Z", "balance_ends_at": "2026-12-13T00:00:00Z"}]})
    id: ProductId
    name: Text
    price_amount: MinorUnits
    currency: Currency = "USD"
    total_stock: Stock
    starts_at: Timestamp | None = None
    ends_at: Timestamp | None = None
    ships_at: Timestamp | None = None
    per_user_limit: PerUserLimit | None = None
    payment_window_seconds: PaymentWindow = 900
    payment_plan: PaymentPlan = Field(default="full", description="full: paid at once; deposit: deposit + balance")
    deposit_amount: MinorUnits | None = Field(default=None, description="deposit per unit, less than the price")
    deposit_credit: MinorUnits | None = Field(
        default=None, description="what a deposit counts for against the balance, per unit; >= deposit_amount")
    deposit_window_seconds: DepositWindow = 1800
    balance_starts_at: Timestamp | None = None
    balance_ends_at: Timestamp | None = None
    deposit_refundable: bool = False

    @model_validator(mode="after")
    def _plan_consistent(self) -> ProductCreate:
        """A deposit plan needs all its parts, in order; a full plan none of them (refused with 400)."""
        deposit_fields = (self.deposit_amount, self.deposit_credit, self.balance_starts_at, self.balance_ends_at)
        if self.payment_plan == "full":
            if any(f is not None for f in deposit_fields) or self.deposit_refundable:
                raise ValueError("deposit fields need payment_plan: deposit")
            return self
        if self.deposit_credit is None:
            self.deposit_credit = self.deposit_amount
        _check_deposit_plan(self)
        return self


def _check_deposit_plan(p: ProductCreate) -> None:
    if p.deposit_amount is None or not 0 < p.deposit_amount < p.price_amount:
        raise ValueError("deposit_amount must be above 0 and below price_amount")
    assert p.deposit_credit is not None
    if not p.deposit_amount <= p.deposit_credit < p.price_amount:
        raise ValueError("deposit_credit must be at least deposit_amount and below price_amount")
    if p.balance_starts_at is None or p.balance_ends_at is None:
        raise ValueError("a deposit plan needs balance_starts_at and balance_ends_at")
    if p.balance_ends_at <= p.balance_starts_at:
        raise ValueError("balance_ends_at must be after balance_starts_at")
    if p.starts_at is not None and p.balance_starts_at <= p.starts_at:
        raise ValueError("balance_starts_at must be after the presale opens (starts_at)")


class ProductPatch(_Rules):
    """Only the fields sent change. The presale window, ship date and per-user limit accept null, which
    clears them; the other columns can't be empty, so null is refused (400) and not offered by the schema."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"total_stock": 1500,
                                                                               "per_user_limit": None}]})

    name: Text | Unset = None
    price_amount: MinorUnits | Unset = None
    currency: Currency | Unset = None
    total_stock: Stock | Unset = None
    starts_at: Timestamp | None = None
    ends_at: Timestamp | None = None
    ships_at: Timestamp | None = None
    per_user_limit: PerUserLimit | None = None
    payment_window_seconds: PaymentWindow | Unset = None

    @field_validator("name", "price_amount", "currency", "total_stock", "payment_window_seconds", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Runs only for fields that were sent: an omitted one keeps its default and means "unchanged".
        if value is None:
            raise ValueError("may be omitted but not null")
        return value


class ProductQuery(BaseModel):
    """GET /api/products paging; unknown parameters are refused, as everywhere."""

    model_config = ConfigDict(extra="forbid")
    cursor: ProductId | None = Field(default=None, description="next_cursor of the previous page")
    limit: int = Field(default=50, ge=1, le=100)


class ProductOut(BaseModel):
    id: str
    name: str
    price_amount: int
    currency: str
    total_stock: int
    reserved: int
    available: int
    starts_at: datetime | None
    ends_at: datetime | None
    ships_at: datetime | None
    per_user_limit: int | None
    payment_window_seconds: int
    payment_plan: PaymentPlan
    deposit_amount: int
    deposit_credit: int
    deposit_window_seconds: int
    balance_starts_at: datetime | None
    balance_ends_at: datetime | None
    deposit_refundable: bool
    created_at: datetime
    updated_at: datetime


class ProductPage(BaseModel):
    items: list[ProductOut]
    next_cursor: str | None
