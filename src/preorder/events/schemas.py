"""Webhook endpoint, delivery and event feed models."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from preorder.events.envelope import EventType
from preorder.orders.schemas import OrderOut
from preorder.types import Text

BIGINT_MAX = 2**63 - 1  # ids are PostgreSQL bigints: a larger one is a 400, not a driver error
_URL_RULES: dict[str, Any] = {"min_length": 8, "max_length": 2048, "pattern": r"^https?://[^\s\x00-\x1f\x7f]+$",
                               "examples": ["https://shop.example/hooks"]}


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "url": "https://shop.example/hooks", "event_types": ["preorder.order.created", "preorder.order.paid"],
        "description": "fulfilment",
    }]})
    url: str = Field(**_URL_RULES)
    event_types: list[EventType] | None = Field(default=None, min_length=1, description="all types when absent")
    description: Text | None = Field(default=None, max_length=500)


class WebhookChange(BaseModel):
    """Pause or resume (a disabled endpoint is resumed the same way), rotate the secret, or edit."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"status": "paused"},
                                                                              {"rotate_secret": True}]})
    status: Literal["active", "paused"] | None = None
    rotate_secret: bool = False
    url: str | None = Field(default=None, **_URL_RULES)
    event_types: list[EventType] | None = Field(default=None, min_length=1, description="null: all types")
    description: Text | None = Field(default=None, max_length=500)


class WebhookOut(BaseModel):
    id: uuid.UUID
    url: str
    event_types: list[EventType] | None
    description: str | None
    status: Literal["active", "paused", "disabled"]
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime


class WebhookWithSecret(WebhookOut):
    secret: str | None = Field(description="the signing secret (whsec_...); shown only when created or rotated")


class WebhookList(BaseModel):
    items: list[WebhookOut]


class DeliveryOut(BaseModel):
    id: int
    event_id: uuid.UUID
    type: EventType
    order_id: uuid.UUID
    sequence: int
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    response_code: int | None
    latency_ms: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: int | None


class DeliveryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=50, ge=1, le=500)
    before: int | None = Field(default=None, ge=1, le=BIGINT_MAX, description="next_cursor of the previous page")


class OrderEvent(BaseModel):
    """A CloudEvents 1.0 document (JSON): what NATS, webhooks and GET /api/events carry."""

    specversion: Literal["1.0"]
    id: uuid.UUID = Field(description="stable across redeliveries; the webhook-id and Nats-Msg-Id")
    source: str
    type: EventType
    subject: uuid.UUID = Field(description="the order id")
    time: datetime
    sequence: int = Field(description="per order: 1 for created, then +1 for each change")
    datacontenttype: Literal["application/json"]
    data: OrderOut | None = Field(description="the order after the change, as GET /api/preorder/{id} shows it")


class EventPage(BaseModel):
    items: list[OrderEvent] = Field(description="oldest first")
    next_cursor: str = Field(description="pass as `after` to get what comes next")


class FeedQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    after: str = Field(default="0", pattern=r"^[0-9]{1,18}$", description="next_cursor of the previous page")
    limit: int = Field(default=100, ge=1, le=1000)
