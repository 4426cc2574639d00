"""Webhook endpoints (admin), their deliveries, and the pull feed of events. Thin: rules live in service.py."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status

from preorder.auth import Admin, CurrentUser
from preorder.errors import (
    Forbidden,
    MalformedBody,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from preorder.events import repository as repo
from preorder.events.envelope import EVENT_TYPES
from preorder.events.schemas import (
    BIGINT_MAX,
    DeliveryOut,
    DeliveryPage,
    DeliveryQuery,
    EventPage,
    FeedQuery,
    OrderEvent,
    WebhookChange,
    WebhookCreate,
    WebhookList,
    WebhookOut,
    WebhookWithSecret,
)
from preorder.events.service import Events
from preorder.events.webhooks import UnsafeUrl
from preorder.responses import problems

router = APIRouter(tags=["events"])
# What every admin route can answer; a body can also be malformed, too large or name an unsafe address.
_ADMIN = (ValidationFailed, Unauthorized, Forbidden, Unavailable)
_BODY = (MalformedBody, UnsafeUrl, PayloadTooLarge)


async def get_events(request: Request) -> Events:
    events: Events = request.app.state.events
    return events


EventsDep = Annotated[Events, Depends(get_events)]


@router.post("/api/webhooks", status_code=status.HTTP_201_CREATED, summary="Register a webhook endpoint",
             responses=problems(*_ADMIN, *_BODY))
async def create_webhook(body: WebhookCreate, _: Admin, events: EventsDep) -> WebhookWithSecret:
    """**Who may call:** admins.

    **Changes:** adds an active endpoint that will be sent the order events of `event_types` (all when absent),
    signed per Standard Webhooks. A URL whose host resolves to a loopback, private, link-local or metadata
    address is refused (`unsafe-webhook-url`). The answer holds the signing secret (whsec_...): it is shown
    here and on rotation only."""
    return await events.create_endpoint(body)


@router.get("/api/webhooks", summary="List webhook endpoints",
            responses=problems(Unauthorized, Forbidden, Unavailable))
async def list_webhooks(_: Admin, events: EventsDep) -> WebhookList:
    """**Who may call:** admins.

    **Changes:** nothing. Every endpoint with its status (`disabled` after failing too long), without secrets."""
    return WebhookList(items=[WebhookOut(**dict(r)) for r in await repo.endpoints(events.pool)])


@router.get("/api/webhooks/{endpoint_id}", summary="One webhook endpoint",
            responses=problems(*_ADMIN, NotFound))
async def get_webhook(endpoint_id: uuid.UUID, _: Admin, events: EventsDep) -> WebhookOut:
    """**Who may call:** admins.

    **Changes:** nothing. The endpoint with its status and since when it has been failing, without its secret."""
    return await events.endpoint(endpoint_id)


@router.patch("/api/webhooks/{endpoint_id}", summary="Pause, resume, rotate the secret or edit an endpoint",
              responses=problems(*_ADMIN, *_BODY, NotFound))
async def change_webhook(endpoint_id: uuid.UUID, body: WebhookChange, _: Admin, events: EventsDep) -> WebhookWithSecret:
    """**Who may call:** admins.

    **Changes:** the fields sent: `status` pauses or resumes it (a disabled endpoint is resumed the same way),
    `rotate_secret` replaces the signing secret, `url` (checked like on create), `event_types` (null: all types)
    and `description`. `secret` is set in the answer only when `rotate_secret` was true."""
    return await events.change_endpoint(endpoint_id, body)


@router.delete("/api/webhooks/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove an endpoint",
               responses=problems(*_ADMIN, NotFound))
async def delete_webhook(endpoint_id: uuid.UUID, _: Admin, events: EventsDep) -> Response:
    """**Who may call:** admins.

    **Changes:** removes the endpoint and its deliveries; nothing more is sent to it."""
    await events.delete_endpoint(endpoint_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/api/webhooks/{endpoint_id}/deliveries", summary="An endpoint's deliveries, newest first",
            responses=problems(*_ADMIN, NotFound))
async def list_deliveries(endpoint_id: uuid.UUID, _: Admin, events: EventsDep,
                          query: Annotated[DeliveryQuery, Query()]) -> DeliveryPage:
    """**Who may call:** admins.

    **Changes:** nothing. Each delivery's status, attempts, last answer code, latency and error, newest first,
    a page at a time (pass `next_cursor` back as `before`)."""
    await events.endpoint(endpoint_id)  # 404 for an unknown endpoint, not an empty list
    rows = await repo.deliveries(events.pool, endpoint_id, before=query.before, limit=query.limit)
    items = [DeliveryOut(**dict(r)) for r in rows]
    return DeliveryPage(items=items, next_cursor=items[-1].id if len(items) == query.limit else None)


@router.post("/api/webhooks/{endpoint_id}/deliveries/{delivery_id}/retry", status_code=status.HTTP_202_ACCEPTED,
             summary="Send a delivery again now", responses=problems(*_ADMIN, NotFound))
async def retry_delivery(
    endpoint_id: uuid.UUID, delivery_id: Annotated[int, Path(ge=1, le=BIGINT_MAX)], _: Admin, events: EventsDep
) -> DeliveryOut:
    """**Who may call:** admins.

    **Changes:** makes the delivery (even a delivered one) pending again, due now, with a fresh retry period; the relay
    sends it next."""
    return await events.retry(endpoint_id, delivery_id)


@router.get("/api/events", summary="Pull feed of order events (CloudEvents), oldest first",
            responses=problems(ValidationFailed, Unauthorized, Unavailable))
async def event_feed(principal: CurrentUser, events: EventsDep, query: Annotated[FeedQuery, Query()]) -> EventPage:
    """**Who may call:** admins, who see every event, and customers, who see the events of their own orders.

    **Changes:** nothing. Order events (CloudEvents) oldest first, after the cursor: poll with
    `after=next_cursor`."""
    return await events.feed(principal, after=int(query.after), limit=query.limit)


def declare_webhooks(webhooks: APIRouter) -> None:
    """The OpenAPI document's `webhooks` section: one entry per event type, each carrying an OrderEvent."""
    for event_type in EVENT_TYPES:
        async def receive(body: OrderEvent) -> None:
            """Signed per Standard Webhooks (webhook-id = event id, webhook-timestamp, webhook-signature)."""

        webhooks.add_api_route(event_type, receive, methods=["POST"], summary=f"{event_type} sent to your endpoint",
                               name=event_type, status_code=200)
