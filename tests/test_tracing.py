"""OpenTelemetry: one create traced from the HTTP request through the Redis script to the PostgreSQL write, under
one trace; on only when the standard OTEL_* variables ask for it."""

from __future__ import annotations

import os
import subprocess
import sys

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from preorder import tracing
from preorder.app import create_app
from tests.conftest import asgi_client, bearer, make_product

ME = bearer("U-trace")


async def test_one_create_gives_http_redis_and_postgresql_spans_under_one_trace(settings, db, redis):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings)
    tracing.instrument(app, provider)
    try:
        async with app.router.lifespan_context(app), asgi_client(app) as c:
            await make_product(c)
            exporter.clear()
            r = await c.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=ME)
            assert r.status_code == 201, r.text
    finally:
        tracing.uninstrument()
    spans = exporter.get_finished_spans()
    by_system = {s.attributes.get("db.system") or s.attributes.get("db.system.name") for s in spans}
    assert {"redis", "postgresql"} <= by_system, [s.name for s in spans]
    http = [s for s in spans if s.parent is None]
    assert [s.name for s in http] == ["POST /api/preorder"]
    assert {s.context.trace_id for s in spans} == {http[0].context.trace_id}, "one trace"
    scripts = [s for s in spans if s.name.upper().startswith("EVALSHA")]
    assert scripts, [s.name for s in spans]


def test_traces_are_on_only_when_the_otel_variables_ask():
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"})


def test_log_lines_carry_the_trace_and_span_ids_inside_a_span():
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("work") as span:
        event = tracing.add_trace_ids(None, "info", {"event": "x"})
    assert event["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert event["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in tracing.add_trace_ids(None, "info", {"event": "outside"})


def test_with_the_variables_unset_the_instrumentation_is_not_even_imported(settings):
    """In a fresh interpreter (this one has imported it for the tests above): zero cost when off. (The API and SDK
    themselves may be imported: redis-py 7 imports them for its own metrics, which stay off unless configured.)"""
    probe = (
        "import sys\n"
        "from preorder.app import create_app\n"
        "from tests.conftest import make_settings\n"
        f"create_app(make_settings({settings.database_url!r}, {settings.redis_url!r}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.instrumentation')))\n"
    )
    assert _last_line_in_a_fresh_interpreter(probe) == "[]"


def test_a_global_tracer_provider_does_not_turn_on_fastapis_own_telemetry_beside_ours(settings):
    """FastAPI (0.165+) traces and measures every request by itself once any global OpenTelemetry provider is set
    (by `opentelemetry-instrument`, say): a second server span beside ours, and its own metrics. The service's
    telemetry is the one described under Traces and Metrics, so that is off. In a fresh interpreter: the global
    provider is once per process."""
    probe = (
        "import asyncio\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "from preorder.app import create_app\n"
        "from tests.conftest import asgi_client, make_settings\n"
        "exporter = InMemorySpanExporter()\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(exporter))\n"
        "trace.set_tracer_provider(provider)\n"
        f"app = create_app(make_settings({settings.database_url!r}, {settings.redis_url!r}))\n"
        "async def main():\n"
        "    async with asgi_client(app) as c:\n"
        "        r = await c.get('/openapi.json')\n"
        "        assert r.status_code == 200, r.status_code\n"
        "asyncio.run(main())\n"
        "print([s.name for s in exporter.get_finished_spans()])\n"
    )
    assert _last_line_in_a_fresh_interpreter(probe) == "[]"


def _last_line_in_a_fresh_interpreter(probe: str) -> str:
    """What `probe` prints last, run by a new Python with no OTEL_* variable set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]
