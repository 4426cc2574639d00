"""Logging: JSON lines (`serve`) or readable console lines (`dev`), one configuration for structlog and the stdlib
loggers (uvicorn's, asyncpg's, the service's own), so every line a process writes has the same shape and carries
the request id (and the trace and span ids when tracing is on)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog
from structlog.typing import Processor

LogFormat = Literal["json", "console"]


@dataclass(slots=True)
class RequestInfo:
    """What the request's log lines and problem+json bodies need; set once per request by the middleware."""

    request_id: str
    problem: str | None = None  # the problem type, when the answer is an error


CURRENT: ContextVar[RequestInfo | None] = ContextVar("preorder_request", default=None)


def _add_request_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    info = CURRENT.get()
    if info is not None:
        event.setdefault("request_id", info.request_id)
    return event


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def configure(fmt: LogFormat, *, level: str = "INFO", extra: tuple[Processor, ...] = ()) -> None:
    """Idempotent: called by the command before it starts uvicorn and again by each worker's app."""
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_request_id,
        *extra,
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        final: list[Processor] = [structlog.processors.format_exc_info, renderer]
    else:
        final = [structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=[*shared, *final],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(),  # sys.stdout as it is when a logger is first used
        cache_logger_on_first_use=True,
    )
    handler = _Stdout()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # uvicorn's lines go through ours, not its own handlers (its access log stays off: ours says more).
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # httpx logs every request it sends at INFO: a line per webhook delivery (their outcomes are in the deliveries
    # list) and 6% of the relay's CPU.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class _Stdout(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stdout as it is at each line (a test runner swaps it), like structlog's loggers."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def get(name: str) -> Any:
    return structlog.get_logger(name)


class JsonAccessLine:
    """The one line per request, in JSON mode, written with orjson directly in the shape of the other lines.
    Measured: through structlog's bound logger and processor chain the line cost ~4x as much as this (most of the
    middleware's cost, several percent of a create); it is the only line written at the request rate. For the same
    reason the lines are flushed every FLUSH_S rather than each with its own write system call."""

    FLUSH_S = 0.05

    def __init__(self) -> None:
        self._second, self._prefix = -1, ""
        self._flush_due = False

    def info(self, event: str, **fields: Any) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time formatted once a second, not once a line
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        fields["event"], fields["level"] = event, "info"
        fields["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        sys.stdout.write(orjson.dumps(fields).decode() + "\n")
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_later(self.FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        sys.stdout.flush()


def access_logger(fmt: LogFormat) -> Any:
    return JsonAccessLine() if fmt == "json" else get("preorder.access")
