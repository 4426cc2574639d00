"""The `preorder` command: dev, serve, relay, migrate, reconcile, token, events."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

from preorder import logs
from preorder.settings import Settings
from preorder.types import ID_RE

# With --workers N, uvicorn's supervisor pings each worker and kills one that does not answer in time (5 s by
# default). A new worker answers only once Python has started and imported this module again (spawn), which
# took over 5 s on a loaded 2-core machine: the supervisor then killed workers still booting, over and over.
# The answer comes from a thread of its own, so a busy event loop never delays it: a long timeout only delays
# replacing a process frozen as a whole.
WORKER_PING_TIMEOUT_S = 30

DEMO_PRODUCT = {"id": "P1001", "name": "Demo preorder console", "price_amount": 49_900, "currency": "USD",
                "total_stock": 1000, "per_user_limit": 5}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preorder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run with embedded PostgreSQL and Redis, migrated, with a demo product")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--log-format", choices=["json", "console"], default="console")
    serve = sub.add_parser("serve", help="production server (PREORDER_DATABASE_URL, PREORDER_REDIS_URL)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, help="default: PREORDER_PORT, else 8000")
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-format", choices=["json", "console"], default=None,
                       help="default: PREORDER_LOG_FORMAT, else json")
    sub.add_parser("relay", help="only the events relay (serve runs one beside its workers unless "
                                 "PREORDER_RELAY_PROCESS=false)")
    sub.add_parser("migrate", help="apply schema migrations to PREORDER_DATABASE_URL")
    rec = sub.add_parser("reconcile", help="compare Redis with PostgreSQL for every product")
    rec.add_argument("--fix", action="store_true", help="settle holds and rebuild drifted products")
    tok = sub.add_parser("token", help="mint a JWT for trying the API (HS256 with PREORDER_JWT_SECRET)")
    tok.add_argument("--sub", required=True, type=_user_id, help="user id: 1-64 of A-Z a-z 0-9 _ -")
    tok.add_argument("--role", choices=["customer", "admin"], default="customer")
    tok.add_argument("--ttl", type=_positive, default=86_400, help="seconds until it expires")
    ev = sub.add_parser("events", help="print the events of the NATS stream PREORDER as they arrive")
    ev.add_argument("--nats-url", default="", help="default: PREORDER_NATS_URL")
    ev.add_argument("--from-start", action="store_true", help="every event the stream holds, then new ones")
    ev.add_argument("--count", type=_count, default=None, help="stop after this many events")
    args = parser.parse_args(argv)
    return int(_COMMANDS[args.command](args) or 0)


def _dev(args: argparse.Namespace) -> int:
    from preorder.devserver import run_dev

    os.environ["PREORDER_LOG_FORMAT"] = args.log_format
    return run_dev(port=args.port)


def _serve(args: argparse.Namespace) -> int:
    if args.log_format:
        os.environ["PREORDER_LOG_FORMAT"] = args.log_format  # the workers read their settings from the environment
    settings = Settings()  # refuse to start with unsafe or missing settings, before forking workers
    logs.configure(settings.log_format)
    # uvicorn stops gracefully on SIGTERM, then raises the signal again for its default action (death by signal,
    # exit status 143). A stop that completed gracefully is a success: with this handler in place it exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    with _metrics_dir(args.workers), _relay_beside(settings):
        port = settings.port if args.port is None else args.port
        uvicorn.run("preorder.app:create_app", factory=True, host=args.host, port=port, workers=args.workers,
                    loop="uvloop", http="httptools", access_log=False, log_config=None,
                    timeout_worker_healthcheck=WORKER_PING_TIMEOUT_S,
                    timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s / 2)))
    return 0


@contextlib.contextmanager
def _metrics_dir(workers: int) -> Iterator[None]:
    """With several workers, prometheus-client's multiprocess mode: each worker writes its metrics to files in one
    folder and a scrape (answered by any worker) sums them. A folder of our own, emptied at start as the mode
    requires, unless the operator named one (PROMETHEUS_MULTIPROC_DIR)."""
    if workers < 2 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="preorder-metrics-") as folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


@contextlib.contextmanager
def _relay_beside(settings: Settings) -> Iterator[None]:
    """The events relay in a process of its own, started before the workers and stopped after them."""
    if not (settings.relay_enabled and settings.relay_process):
        yield
        return
    from preorder.events.process import RelayBeside

    relay = RelayBeside()
    relay.start()
    try:
        yield
    finally:
        relay.stop(timeout_s=max(1.0, settings.shutdown_timeout_s / 2))


def _relay(_: argparse.Namespace) -> int:
    from preorder.events.process import run

    settings = Settings()
    if not settings.relay_enabled:
        print("PREORDER_RELAY_ENABLED is false: nothing to relay", file=sys.stderr)
        return 2
    return run(settings)


def _migrate(_: argparse.Namespace) -> int:
    # Imported here, not at the top: each `serve --workers N` worker starts by importing this module again
    # (multiprocessing's spawn), and alembic + SQLAlchemy were most of that time (see WORKER_PING_TIMEOUT_S).
    from preorder import migrate as migrations

    settings = Settings(env="dev")
    if not settings.database_url:
        print("PREORDER_DATABASE_URL is not set", file=sys.stderr)
        return 2

    migrations.upgrade(settings.database_url)
    print("schema is at the latest migration")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from preorder.reconcile_cmd import reconcile

    return asyncio.run(reconcile(Settings(env="dev"), fix=args.fix))


def _token(args: argparse.Namespace) -> int:
    from preorder.auth import mint_token

    settings = Settings(env="dev")
    if settings.jwt_algorithm != "HS256":
        # With RS256 the service holds only the public key: tokens come from the issuer's private key.
        print("preorder token mints HS256 tokens only; with RS256, sign with your issuer's key", file=sys.stderr)
        return 2
    if not settings.jwt_secret:
        print("PREORDER_JWT_SECRET is not set", file=sys.stderr)
        return 2
    print(mint_token(settings, sub=args.sub, role=args.role, ttl_s=args.ttl))
    return 0


def _events(args: argparse.Namespace) -> int:
    from preorder.events.watch import watch

    url = args.nats_url or Settings(env="dev").nats_url
    if not url:
        print("give --nats-url or set PREORDER_NATS_URL (preorder dev prints it)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(watch(url, from_start=args.from_start, count=args.count))
    except KeyboardInterrupt:
        return 0


def _user_id(value: str) -> str:
    """The service refuses a token whose subject is not a valid id, so refuse to mint one."""
    if not ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError("must be 1-64 of A-Z a-z 0-9 _ -")
    return value


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("must be a whole number, at least 1")
    return int(value)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of seconds, at least 1")
    return int(value)


_COMMANDS = {"dev": _dev, "serve": _serve, "relay": _relay, "migrate": _migrate, "reconcile": _reconcile,
             "token": _token, "events": _events}


def dev_secret(folder: Path) -> str:
    path = folder / "jwt-secret"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


if __name__ == "__main__":
    raise SystemExit(main())
