"""Product request and response models."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from preorder.types import Currency, MinorUnits, ProductId, Timestamp

Stock = StrictInt


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _window_ordered(self) -> _Rules:
        starts, ends = getattr(self, "starts_at", None), getattr(self, "ends_at", None)
        if starts and ends and ends <= starts:
            raise ValueError("ends_at must be after starts_at")
        return self


class ProductCreate(_Rules):
    id: ProductId
    name: str = Field(min_length=1, max_length=200)
    price_amount: MinorUnits
    currency: Currency = "USD"
    total_stock: Stock = Field(ge=0, le=10**9)
    starts_at: Timestamp | None = None
    ends_at: Timestamp | None = None
    ships_at: Timestamp | None = None
    per_user_limit: StrictInt | None = Field(default=None, ge=1, le=10**6)
    payment_window_seconds: StrictInt = Field(default=900, ge=1, le=30 * 86_400)


class ProductPatch(_Rules):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    price_amount: MinorUnits | None = None
    currency: Currency | None = None
    total_stock: Stock | None = Field(default=None, ge=0, le=10**9)
    starts_at: Timestamp | None = None
    ends_at: Timestamp | None = None
    ships_at: Timestamp | None = None
    per_user_limit: StrictInt | None = Field(default=None, ge=1, le=10**6)
    payment_window_seconds: StrictInt | None = Field(default=None, ge=1, le=30 * 86_400)


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
    created_at: datetime
    updated_at: datetime


class ProductPage(BaseModel):
    items: list[ProductOut]
    next_cursor: str | None
