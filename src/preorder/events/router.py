"""Webhook endpoints (admin), their deliveries, and the pull feed of events. Thin: rules live in service.py."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status

from preorder.auth import Admin, CurrentUser
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
from preorder.responses import problems

router = APIRouter(tags=["events"])


async def get_events(request: Request) -> Events:
    events: Events = request.app.state.events
    return events


EventsDep = Annotated[Events, Depends(get_events)]


@router.post("/api/webhooks", status_code=status.HTTP_201_CREATED, summary="Register a webhook endpoint",
             responses=problems(400, 401, 403, 503))
async def create_webhook(body: WebhookCreate, _: Admin, events: EventsDep) -> WebhookWithSecret:
    """The answer holds the signing secret (whsec_...): it is shown here and on rotation only."""
    return await events.create_endpoint(body)


@router.get("/api/webhooks", summary="List webhook endpoints", responses=problems(401, 403, 503))
async def list_webhooks(_: Admin, events: EventsDep) -> WebhookList:
    return WebhookList(items=[WebhookOut(**dict(r)) for r in await repo.endpoints(events.pool)])


@router.get("/api/webhooks/{endpoint_id}", summary="One webhook endpoint", responses=problems(400, 401, 403, 404, 503))
async def get_webhook(endpoint_id: uuid.UUID, _: Admin, events: EventsDep) -> WebhookOut:
    return await events.endpoint(endpoint_id)


@router.patch("/api/webhooks/{endpoint_id}", summary="Pause, resume, rotate the secret or edit an endpoint",
              responses=problems(400, 401, 403, 404, 503))
async def change_webhook(endpoint_id: uuid.UUID, body: WebhookChange, _: Admin, events: EventsDep) -> WebhookWithSecret:
    """`secret` is set in the answer only when `rotate_secret` was true."""
    return await events.change_endpoint(endpoint_id, body)


@router.delete("/api/webhooks/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove an endpoint",
               responses=problems(400, 401, 403, 404, 503))
async def delete_webhook(endpoint_id: uuid.UUID, _: Admin, events: EventsDep) -> Response:
    await events.delete_endpoint(endpoint_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/api/webhooks/{endpoint_id}/deliveries", summary="An endpoint's deliveries, newest first",
            responses=problems(400, 401, 403, 404, 503))
async def list_deliveries(endpoint_id: uuid.UUID, _: Admin, events: EventsDep,
                          query: Annotated[DeliveryQuery, Query()]) -> DeliveryPage:
    await events.endpoint(endpoint_id)  # 404 for an unknown endpoint, not an empty list
    rows = await repo.deliveries(events.pool, endpoint_id, before=query.before, limit=query.limit)
    items = [DeliveryOut(**dict(r)) for r in rows]
    return DeliveryPage(items=items, next_cursor=items[-1].id if len(items) == query.limit else None)


@router.post("/api/webhooks/{endpoint_id}/deliveries/{delivery_id}/retry", status_code=status.HTTP_202_ACCEPTED,
             summary="Send a delivery again now", responses=problems(400, 401, 403, 404, 503))
async def retry_delivery(
    endpoint_id: uuid.UUID, delivery_id: Annotated[int, Path(ge=1, le=BIGINT_MAX)], _: Admin, events: EventsDep
) -> DeliveryOut:
    return await events.retry(endpoint_id, delivery_id)


@router.get("/api/events", summary="Pull feed of order events (CloudEvents), oldest first",
            responses=problems(400, 401, 503))
async def event_feed(principal: CurrentUser, events: EventsDep, query: Annotated[FeedQuery, Query()]) -> EventPage:
    """Admins see every event, customers the events of their own orders. Poll with `after=next_cursor`."""
    return await events.feed(principal, after=int(query.after), limit=query.limit)


def declare_webhooks(webhooks: APIRouter) -> None:
    """The OpenAPI document's `webhooks` section: one entry per event type, each carrying an OrderEvent."""
    for event_type in EVENT_TYPES:
        async def receive(body: OrderEvent) -> None:
            """Signed per Standard Webhooks (webhook-id = event id, webhook-timestamp, webhook-signature)."""

        webhooks.add_api_route(event_type, receive, methods=["POST"], summary=f"{event_type} sent to your endpoint",
                               name=event_type, status_code=200)
