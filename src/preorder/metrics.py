"""Every Prometheus metric the service exports, defined once. Names follow Prometheus conventions (base units,
`_total`, `_seconds`); labels are bounded sets (route templates, reasons, statuses), never user or order ids.

With several worker processes (`preorder serve --workers N`) prometheus-client's multiprocess mode is on
(PROMETHEUS_MULTIPROC_DIR, set up by `preorder serve`): each process writes its values to files there and a
scrape sums them, so this module must be imported after that variable is set, i.e. in the workers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from functools import cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector

# Request latency: the create path answers in ~15 ms at p50 under load, so the buckets are dense below 100 ms.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUEST_SECONDS = Histogram(
    "http_server_request_duration_seconds", "HTTP requests by method, route template and status class",
    ["method", "route", "status_class"], buckets=_LATENCY,
)
IN_FLIGHT = Gauge("http_server_active_requests", "HTTP requests being served", multiprocess_mode="livesum")

ORDERS_CREATED = Counter("preorder_orders_created_total", "Orders created (replays of an Idempotency-Key excluded)")
CREATE_REFUSALS = Counter("preorder_order_create_refusals_total", "Order creates refused, by reason", ["reason"])
STATUS_CHANGES = Counter("preorder_order_status_changes_total", "Order status changes", ["from_status", "to_status"])
SIDE_EFFECT_FAILURES = Counter(
    "preorder_redis_side_effect_failures_total",
    "Redis steps after a committed change that failed and were left to a TTL or the reconciler", ["step"],
)

RESERVE_SECONDS = Histogram("preorder_reserve_script_duration_seconds",
                            "One reserve script round trip (all the asks of one loop turn)", buckets=_FAST)
RESERVE_ASKS = Histogram("preorder_reserve_script_asks", "Asks decided by one reserve script call", buckets=_SIZES)
COMMIT_BATCH = Histogram("preorder_order_commit_batch_size", "Order rows written by one group-commit INSERT",
                         buckets=_SIZES)
COMMIT_SECONDS = Histogram("preorder_order_commit_duration_seconds", "One group-commit INSERT, connection included",
                           buckets=_FAST)

POOL_IN_USE = Gauge("preorder_db_pool_connections_in_use", "PostgreSQL connections checked out of the pool",
                    multiprocess_mode="livesum")
POOL_WAITING = Gauge("preorder_db_pool_acquires_waiting", "Pool acquires in progress (waiting for a connection)",
                     multiprocess_mode="livesum")
POOL_MAX = Gauge("preorder_db_pool_connections_max", "Pool size limit (PREORDER_DB_POOL_MAX), summed over processes",
                 multiprocess_mode="livesum")

SWEEPER_EXPIRED = Counter("preorder_sweeper_expired_orders_total", "Unpaid orders cancelled by the sweeper")
SWEEPER_RUNS = Counter("preorder_sweeper_runs_total", "Sweeper rounds that completed")
RECONCILER_PASSES = Counter("preorder_reconciler_passes_total", "Reconciler passes that completed", ["kind"])
RECONCILER_HOLDS = Counter("preorder_reconciler_holds_settled_total",
                           "Holds the reconciler settled (released, dropped, orphan)", ["action"])
RECONCILER_DRIFT = Counter(
    "preorder_reconciler_drift_total",
    "Disagreements between Redis and PostgreSQL the reconciler found and repaired (holds and stale products)",
)
REBUILDS = Counter("preorder_stock_rebuilds_total", "Products whose Redis stock was rebuilt from PostgreSQL")
REDIS_BEHIND = Counter(
    "preorder_redis_behind_total",
    "Times Redis was found behind PostgreSQL (it went back in time: a failover, a restore, a lost AOF second), "
    "by what found it: a write PostgreSQL refused, counters below PostgreSQL's, a new Redis identity",
    ["found_by"],
)
BACKGROUND_FAILURES = Counter("preorder_background_round_failures_total", "Background rounds that failed")

STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class Off:
    """A metric while recording is off (PREORDER_METRICS=false): every update does nothing. For measuring what
    recording costs (README "Performance"), and for an operator who scrapes nothing."""

    def labels(self, *_: object) -> Off:
        return self

    def inc(self, *_: object) -> None:
        pass

    dec = set = observe = inc

    def track_inprogress(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


_RECORDED = {name: value for name, value in globals().items() if isinstance(value, Counter | Gauge | Histogram)}


def record(on: bool) -> None:
    """Record the service's metrics in this process, or not: every module-level metric becomes an Off (and back),
    so the code that updates them (`metrics.NAME.inc()`) needs no test of its own. /metrics still answers."""
    off = Off()
    for name, metric in _RECORDED.items():
        globals()[name] = metric if on else off
    for lookup in (refused, status_changed, side_effect_failed):
        lookup.cache_clear()


@cache
def refused(reason: str) -> Counter:
    """The label child for a refusal reason, looked up once (a labels() call per request measured ~1 us)."""
    return CREATE_REFUSALS.labels(reason)


@cache
def status_changed(frm: str, to: str) -> Counter:
    return STATUS_CHANGES.labels(frm, to)


@cache
def side_effect_failed(step: str) -> Counter:
    return SIDE_EFFECT_FAILURES.labels(step)


def _declare_label_sets() -> None:
    """Every bounded label set exported at 0 from the start, so rate() and the alerts work before the first event."""
    for reason in ("out_of_stock", "sold_out_mark", "user_limit", "rate_limited", "not_started", "ended",
                   "unavailable"):
        refused(reason)
    for step in ("idempotency_marker", "release", "drop"):
        side_effect_failed(step)
    for kind in ("full", "regular"):
        RECONCILER_PASSES.labels(kind)
    for action in ("released", "dropped", "orphans"):
        RECONCILER_HOLDS.labels(action)


_declare_label_sets()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def registry() -> CollectorRegistry:
    """What a scrape reads: this process's registry, or the sum of every process's files in multiprocess mode."""
    if multiprocess_dir() is None:
        return REGISTRY
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    return merged


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (in flight, pool) from the sums."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class StockLevels(Collector):
    """Stock per product (total, reserved, available) read at scrape time, for the products in a live presale."""

    def __init__(self, levels: Iterable[tuple[str, int, int]]) -> None:
        self._levels = list(levels)

    def collect(self) -> Iterable[Metric]:
        total = GaugeMetricFamily("preorder_stock_total_units", "Units on sale", labels=["product_id"])
        reserved = GaugeMetricFamily("preorder_stock_reserved_units", "Units reserved by live orders",
                                     labels=["product_id"])
        available = GaugeMetricFamily("preorder_stock_available_units", "Units left", labels=["product_id"])
        for product_id, t, r in self._levels:
            total.add_metric([product_id], t)
            reserved.add_metric([product_id], r)
            available.add_metric([product_id], t - r)
        return [total, reserved, available]
