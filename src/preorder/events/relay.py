"""The relay: queue new events for every sink, send what is due, record the outcome, retry failures with
backoff, purge old bookkeeping, and keep the lag gauge current; in a burst of orders, hold back for a bounded
while (Burst). `preorder serve` runs it in a process of its own (events/process.py, at nice +19); with
relay_process=false each web worker runs it. Several relays at once are safe: they take turns fanning out (the
cursor's row, SKIP LOCKED) and claim disjoint deliveries."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
from prometheus_client import Gauge

from preorder.db import PgPool
from preorder.events import repository as repo
from preorder.events.envelope import cloud_event, encode
from preorder.events.webhooks import WebhookSender
from preorder.settings import Settings

if TYPE_CHECKING:
    from preorder.events.nats_sink import NatsSink

log = logging.getLogger("preorder.events")
# Every process reads the same lag from PostgreSQL: with several workers the scrape shows the largest of the live ones.
LAG = Gauge("preorder_events_relay_lag_seconds", "Age of the oldest event not yet received by every active sink",
            multiprocess_mode="livemax")
YIELDING = Gauge("preorder_events_relay_yielding", "1 while the relay holds deliveries back for a burst of orders",
                 multiprocess_mode="livemax")
# The broker is ours and a retry costs it nothing: its backoff stays short, so events flow soon after it is back.
_NATS_BACKOFF_MAX_S = 5.0
_WEBHOOK_CONCURRENCY = 64
_HOUSEKEEPING_S = 1.0


class LagWatch:
    """The relay's lag, read from PostgreSQL: what a web worker shows (/readyz, /metrics) when the relay runs in
    another process."""

    def __init__(self, pool: PgPool) -> None:
        self.pool = pool
        self.lag_s = 0.0

    async def update(self) -> None:
        self.lag_s = await repo.lag_seconds(self.pool)
        LAG.set(self.lag_s)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.update()
            except Exception as exc:  # PostgreSQL is down: /readyz says so on its own
                log.debug("relay lag not read: %r", exc)
            await asyncio.sleep(_HOUSEKEEPING_S)


class Burst:
    """Whether the relay gives way to a burst of orders: while events are written faster than `events_per_s`, it
    holds its deliveries back, until the oldest undelivered event has waited `max_wait_s`. Past that it sends again,
    as much as keeps the wait at that bound: a burst longer than the bound gets no CPU back, only delay."""

    def __init__(self, *, events_per_s: float, max_wait_s: float) -> None:
        self.events_per_s, self.max_wait_s = events_per_s, max_wait_s
        self.enabled = events_per_s > 0 and max_wait_s > 0
        self.rate = 0.0  # events written per second, between the last two looks
        self.yielding = False
        self._last: tuple[float, int] | None = None

    def observe(self, *, now: float, last_event_id: int, lag_s: float) -> bool:
        """Take one look at the outbox (its newest event id, and the relay's lag); True when that changed whether
        the relay yields."""
        if self._last is not None:
            then, last_id = self._last
            self.rate = max(0, last_event_id - last_id) / max(now - then, 1e-3)
        self._last = (now, last_event_id)
        yielding = self.enabled and self.rate > self.events_per_s and lag_s < self.max_wait_s
        changed, self.yielding = yielding != self.yielding, yielding
        return changed


class Relay(LagWatch):
    def __init__(self, *, pool: PgPool, settings: Settings) -> None:
        super().__init__(pool)
        self.settings = settings
        self._nats = _nats_sink(settings.nats_url) if settings.nats_url else None
        self._webhooks = WebhookSender(timeout_s=settings.webhook_timeout_s,
                                       allow_private=settings.webhook_allow_private,
                                       max_connections=_WEBHOOK_CONCURRENCY)
        self.burst = Burst(events_per_s=settings.relay_burst_events_per_s,
                           max_wait_s=settings.relay_burst_max_wait_s)

    async def run_forever(self) -> None:
        sending: list[Callable[[], Awaitable[bool]]] = [self.fan_out, self.send_webhooks]
        if self._nats is not None:
            sending.append(self.send_nats)
        try:
            await self._sync_nats_sink()  # before any fan-out: an event queued without the sink would miss it
            await asyncio.gather(self._repeat(self.housekeeping),
                                 *(self._repeat(step, unless_yielding=True) for step in sending))
        finally:
            await self.close()

    async def _sync_nats_sink(self) -> None:
        while True:
            try:
                await repo.sync_nats_sink(self.pool, self.settings.nats_url)
                return
            except Exception as exc:  # PostgreSQL not there yet: the relay waits for it like everything else
                log.warning("relay start failed: %r", exc)
            await asyncio.sleep(self.settings.relay_interval_s)

    async def _repeat(self, step: Callable[[], Awaitable[bool]], *, unless_yielding: bool = False) -> None:
        """Run a step again at once while it has more work, else after the idle pause; never die."""
        while True:
            if unless_yielding and self.burst.yielding:
                await asyncio.sleep(self.settings.relay_interval_s)
                continue
            try:
                busy = await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL is down or a peer misbehaved: try again next round
                log.warning("relay step %s failed: %r", step.__name__, exc)
                busy = False
            if not busy:
                await asyncio.sleep(self.settings.relay_interval_s)

    async def fan_out(self) -> bool:
        queued = await repo.fan_out(self.pool, limit=self.settings.relay_batch,
                                    retry_for_s=self.settings.webhook_retry_for_s)
        return queued == self.settings.relay_batch

    async def send_nats(self) -> bool:
        nats = self._nats
        assert nats is not None
        claimed = await self._claim("nats", self.settings.relay_batch)
        if not claimed:
            return False
        built = [(row, self._event(row)) for row in claimed]
        broken = [self._unbuildable(row, event) for row, event in built if isinstance(event, Exception)]
        ready = [(row, event) for row, event in built if not isinstance(event, Exception)]
        started = time.monotonic()
        failures = await nats.publish_all([(event, encode(event)) for _, event in ready])
        latency_ms = int((time.monotonic() - started) * 1000)
        await self._record(broken + [self._published(row, failure, latency_ms)
                                     for (row, _), failure in zip(ready, failures, strict=True)])
        return len(claimed) == self.settings.relay_batch

    def _published(self, row: asyncpg.Record, failure: BaseException | None, latency_ms: int) -> repo.Outcome:
        if failure is None:
            return repo.Outcome(row["id"], row["sink_id"], True, 0.0, latency_ms=latency_ms)
        return self._failed(row, error=f"{type(failure).__name__}: {failure}"[:500], cap_s=_NATS_BACKOFF_MAX_S)

    async def send_webhooks(self) -> bool:
        claimed = await self._claim("webhook", _WEBHOOK_CONCURRENCY)
        outcomes = await asyncio.gather(*(self._deliver(row) for row in claimed))
        await self._record(outcomes)
        return len(claimed) == _WEBHOOK_CONCURRENCY

    async def housekeeping(self) -> bool:
        await self.update()
        await self._watch_burst()
        await repo.purge(self.pool, retention_s=self.settings.events_retention_s, limit=1000)
        await asyncio.sleep(_HOUSEKEEPING_S)
        return False

    async def _watch_burst(self) -> None:
        if not self.burst.enabled:
            return
        last_id = await repo.last_event_id(self.pool)
        if self.burst.observe(now=time.monotonic(), last_event_id=last_id, lag_s=self.lag_s):
            if self.burst.yielding:
                log.info("relay gives way to a burst: %.0f events/s, oldest undelivered %.1f s",
                         self.burst.rate, self.lag_s)
            else:
                log.info("relay sends again: %.0f events/s, oldest undelivered %.1f s", self.burst.rate, self.lag_s)
        YIELDING.set(1 if self.burst.yielding else 0)

    async def _claim(self, kind: str, limit: int) -> list[asyncpg.Record]:
        return await repo.claim(self.pool, kind=kind, limit=limit, lease_s=self.settings.relay_lease_s)

    async def _deliver(self, row: asyncpg.Record) -> repo.Outcome:
        event = self._event(row)
        if isinstance(event, Exception):
            return self._unbuildable(row, event)
        answer = await self._webhooks.send(url=row["url"], secret=row["secret"], msg_id=event["id"], body=encode(event))
        if answer.ok:
            return repo.Outcome(row["id"], row["sink_id"], True, 0.0, answer.status, answer.latency_ms)
        failed = self._failed(row, error=answer.error, cap_s=self.settings.webhook_backoff_max_s)
        return repo.Outcome(row["id"], row["sink_id"], False, failed.retry_in_s, answer.status, answer.latency_ms,
                            answer.error)

    def _failed(self, row: asyncpg.Record, *, error: str | None, cap_s: float) -> repo.Outcome:
        return repo.Outcome(row["id"], row["sink_id"], False, self._backoff(row["attempts"], cap_s), error=error)

    def _backoff(self, attempts: int, cap_s: float) -> float:
        """Exponential with jitter (half to all of the step), so endpoints that failed together retry apart."""
        step = min(cap_s, self.settings.relay_backoff_base_s * 2 ** min(attempts - 1, 30))
        return float(step * random.uniform(0.5, 1.0))

    def _event(self, row: asyncpg.Record) -> dict[str, Any] | ValueError:
        """The envelope, or why it can't be built (a snapshot this version can't read): that delivery is retried
        and shows the error, instead of one event stopping every other."""
        try:
            return cloud_event(row, source=self.settings.events_source)
        except ValueError as exc:  # pydantic's ValidationError included
            return exc

    def _unbuildable(self, row: asyncpg.Record, exc: Exception) -> repo.Outcome:
        log.error("event %s can't be built: %r", row["event_id"], exc)
        return self._failed(row, error=f"can't build the event: {exc}"[:500], cap_s=self.settings.webhook_backoff_max_s)

    async def _record(self, outcomes: list[repo.Outcome]) -> None:
        if not outcomes:
            return
        await repo.record(self.pool, outcomes, disable_after_s=self.settings.webhook_disable_after_s)

    async def close(self) -> None:
        await self._webhooks.close()
        if self._nats is not None:
            await self._nats.close()


def _nats_sink(url: str) -> NatsSink:
    """Imported only when NATS is configured: the client library is most of a second of start-up on a busy host."""
    from preorder.events.nats_sink import NatsSink

    return NatsSink(url, timeout_s=2.0)
