"""OpenTelemetry traces of the HTTP requests (FastAPI), PostgreSQL (asyncpg) and Redis (redis-py), turned on only
by the standard OTEL_* variables (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SDK_DISABLED, ...).
Off, the default, costs nothing: not even the instrumentation is imported.

These variables are OpenTelemetry's own (every SDK and collector documents them), so they are read here rather
than renamed into PREORDER_ settings."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

# Health checks and scrapes every few seconds would drown the traces that matter.
_EXCLUDED = "healthz,readyz,metrics"


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def provider_from_env(env: Mapping[str, str] = os.environ) -> TracerProvider:
    """A provider exporting in batches to the exporters OTEL_TRACES_EXPORTER names (default otlp, over HTTP)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "preorder")}))
    for name in (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name.strip())))
    return provider


def _exporter(name: str) -> Any:
    # `otlp` is the gRPC exporter's entry point; this service ships the HTTP one (no grpcio in the image).
    wanted_name = "otlp_proto_http" if name == "otlp" else name
    found = entry_points(group="opentelemetry_traces_exporter", name=wanted_name)
    if not found:
        raise ValueError(f"OTEL_TRACES_EXPORTER names an exporter that is not installed: {name}")
    return next(iter(found)).load()()


def instrument(app: FastAPI, provider: TracerProvider) -> None:
    """Spans for the app's requests, and (process-wide) for every asyncpg statement and Redis command."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls=_EXCLUDED)
    for instrumentor in (AsyncPGInstrumentor(), RedisInstrumentor()):  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
    _state["clients"] = True


def clients_traced() -> bool:
    """Whether redis-py and asyncpg are instrumented in this process: code that talks to Redis below redis-py's
    commands (stock/batching.py) then goes through them, so their spans exist."""
    return _state["clients"]


_state = {"clients": False}


def uninstrument() -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    RedisInstrumentor().uninstrument()
    _state["clients"] = False


def add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A log processor: the trace and span ids of the current span, so a log line leads to its trace."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event
