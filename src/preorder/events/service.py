"""Webhook endpoint rules (address check, secrets shown once) and the event feed's visibility."""

from __future__ import annotations

import uuid

import asyncpg

from preorder.auth import Principal
from preorder.db import PgPool
from preorder.errors import NotFound
from preorder.events import repository as repo
from preorder.events.envelope import cloud_event
from preorder.events.schemas import (
    DeliveryOut,
    EventPage,
    OrderEvent,
    WebhookChange,
    WebhookCreate,
    WebhookOut,
    WebhookWithSecret,
)
from preorder.events.webhooks import check_url, new_secret
from preorder.ids import new_id
from preorder.settings import Settings

# A little over the longest a single-statement event write can take to commit (the statement timeout): the
# feed lists an event only once every event before it is surely visible.
_FEED_SETTLE_MARGIN_S = 1.0


class Events:
    def __init__(self, *, pool: PgPool, settings: Settings) -> None:
        self.pool, self.settings = pool, settings

    async def create_endpoint(self, body: WebhookCreate) -> WebhookWithSecret:
        await check_url(body.url, allow_private=self.settings.webhook_allow_private)
        secret = new_secret()
        row = await repo.insert_endpoint(self.pool, repo.NewEndpoint(
            endpoint_id=new_id(), url=body.url, secret=secret, event_types=body.event_types,
            description=body.description,
        ))
        return WebhookWithSecret(**dict(row), secret=secret)

    async def endpoint(self, endpoint_id: uuid.UUID) -> WebhookOut:
        return WebhookOut(**dict(_found(await repo.endpoint(self.pool, endpoint_id), endpoint_id)))

    async def change_endpoint(self, endpoint_id: uuid.UUID, body: WebhookChange) -> WebhookWithSecret:
        if body.url is not None:
            await check_url(body.url, allow_private=self.settings.webhook_allow_private)
        secret = new_secret() if body.rotate_secret else None
        change = repo.EndpointChange(
            url=body.url, secret=secret, description=body.description, status=body.status,
            set_event_types="event_types" in body.model_fields_set, event_types=body.event_types,
        )
        row = _found(await repo.update_endpoint(self.pool, endpoint_id, change), endpoint_id)
        return WebhookWithSecret(**dict(row), secret=secret)

    async def delete_endpoint(self, endpoint_id: uuid.UUID) -> None:
        if not await repo.delete_endpoint(self.pool, endpoint_id):
            raise NotFound(f"No webhook endpoint {endpoint_id}")

    async def retry(self, endpoint_id: uuid.UUID, delivery_id: int) -> DeliveryOut:
        row = await repo.retry(self.pool, endpoint_id, delivery_id, retry_for_s=self.settings.webhook_retry_for_s)
        if row is None:
            raise NotFound(f"No delivery {delivery_id} for webhook endpoint {endpoint_id}")
        return DeliveryOut(**dict(row))

    async def feed(self, principal: Principal, *, after: int, limit: int) -> EventPage:
        """Admins see every event, a customer those of its own orders; oldest first, after the cursor."""
        rows = await repo.feed(
            self.pool, after=after, limit=limit, user_id=None if principal.is_admin else principal.sub,
            settle_s=self.settings.db_statement_timeout_ms / 1000 + _FEED_SETTLE_MARGIN_S,
        )
        items = [OrderEvent.model_validate(cloud_event(r, source=self.settings.events_source)) for r in rows]
        return EventPage(items=items, next_cursor=str(rows[-1]["id"] if rows else after))


def _found(row: asyncpg.Record | None, endpoint_id: uuid.UUID) -> asyncpg.Record:
    if row is None:
        raise NotFound(f"No webhook endpoint {endpoint_id}")
    return row
