"""The CloudEvents 1.0 envelope (JSON) every sink receives, built from an outbox row."""

from __future__ import annotations

import typing
from datetime import datetime
from typing import Any, Literal

import asyncpg
import orjson

from preorder.orders.schemas import OrderOut

TYPE_PREFIX = "preorder.order."
# One type per status an order can reach; `created` is the order's first event (status pending). A recorded
# payment, a created refund and a refund paid back are events of their order too (the status unchanged, or changed
# by the next one).
EventType = Literal[
    "preorder.order.created", "preorder.order.deposit_paid", "preorder.order.paid", "preorder.order.shipped",
    "preorder.order.completed", "preorder.order.cancelled", "preorder.order.forfeited",
    "preorder.order.payment_recorded", "preorder.order.refund_created", "preorder.order.refund_succeeded",
]
EVENT_TYPES: tuple[str, ...] = typing.get_args(EventType)
CONTENT_TYPE = "application/cloudevents+json"


def cloud_event(row: asyncpg.Record, *, source: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": str(row["event_id"]),
        "source": source,
        "type": TYPE_PREFIX + row["type"],
        "subject": str(row["order_id"]),
        "time": _utc(row["created_at"]),
        "sequence": row["sequence"],
        "datacontenttype": "application/json",
        "data": order_data(row["data"]),
    }


def order_data(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    """The order row as stored with the event, shown as GET /api/preorder/{id} shows an order. Events written
    before the outbox existed (migration 0004) carry no snapshot."""
    if snapshot is None:
        return None
    order = OrderOut.model_validate({**snapshot, "order_id": snapshot["id"]})
    return order.model_dump(mode="json")


def encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


def _utc(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")
