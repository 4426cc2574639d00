"""What the load runs against: PostgreSQL and Redis (embedded, or the ones named by PREORDER_DATABASE_URL /
PREORDER_REDIS_URL), the real service as a `preorder serve` subprocess, the `bare` app, and the seed data
(products created through the API, customer tokens written to a file the wrk script reads)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from bench import procs
from preorder.auth import mint_token
from preorder.db import asyncpg_dsn
from preorder.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from preorder.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: preorder and uvicorn live beside this python
# High enough that the rate limiter never answers 429 to the load: the benchmark measures the order path.
NO_RATE_LIMIT = "10000000"
PRICE = 4_990
LONG_WINDOW_S = 30 * 86_400  # no bench order expires mid-run, so the sweeper never changes the counts


@dataclass(frozen=True)
class Backends:
    database_url: str
    redis_url: str
    embedded: bool
    redis_pid: int | None = None  # embedded ones only: their CPU is ours, not "foreign" noise
    postmaster_pid: int | None = None

    def pids(self) -> list[int]:
        pg = [self.postmaster_pid, *procs.children(self.postmaster_pid)] if self.postmaster_pid else []
        return [p for p in [self.redis_pid, *pg] if p is not None]


def start_backends(folder: Path, started: contextlib.ExitStack, *, core: int | None) -> Backends:
    """Embedded PostgreSQL and Redis unless the environment names servers; pinned off the server core."""
    db_url, redis_url = os.environ.get("PREORDER_DATABASE_URL", ""), os.environ.get("PREORDER_REDIS_URL", "")
    embedded = not (db_url and redis_url)
    postmaster = redis_pid = None
    if not db_url:
        pg = EmbeddedPostgres(folder / "postgres")
        db_url = pg.start()
        started.callback(pg.stop)
        postmaster = int((folder / "postgres" / "postmaster.pid").read_text().split()[0])
        _pin_tree(postmaster, core)
    if not redis_url:
        rd = EmbeddedRedis(folder / "redis", persist=False)
        redis_url = rd.start()
        started.callback(rd.stop)
        redis_pid = rd.process.pid if rd.process else None
        if core is not None and redis_pid:
            procs.pin(redis_pid, {core})
    if postmaster is not None:
        asyncio.run(ready_wal(db_url))
    return Backends(db_url, redis_url, embedded, redis_pid, postmaster)


# A new cluster has no spare WAL segments: each one it fills is created first, writing 16 MB of zeros and an fsync
# while every commit waits (measured: all 64 creates stalled 70-85 ms once a segment, every 2-4 s). A database
# that has run for a while recycles its old segments instead, up to min_wal_size (README "Performance").
WAL_READY_MB = 1024


async def ready_wal(db_url: str) -> int:
    """Give the embedded PostgreSQL the spare segments a running database has: switch through min_wal_size of
    WAL and checkpoint, which recycles the old segments as the next ones (as many as it expects to need before
    the next checkpoint: 34 with the default max_wal_size). Returns how many segments are ready ahead."""
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        await conn.execute(f"ALTER SYSTEM SET min_wal_size = '{WAL_READY_MB}MB'")
        await conn.execute("SELECT pg_reload_conf()")
        segment = await conn.fetchval("SELECT pg_size_bytes(current_setting('wal_segment_size'))")
        for _ in range(WAL_READY_MB * 2**20 // segment):
            # A switch with nothing written since the last one does nothing: write a record first.
            await conn.execute("SELECT pg_logical_emit_message(false, 'bench', 'ready'), pg_switch_wal()")
        await conn.execute("CHECKPOINT")
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_ls_waldir() WHERE name > pg_walfile_name(pg_current_wal_lsn())"))
    finally:
        await conn.close()


def _pin_tree(postmaster: int, core: int | None) -> None:
    """Pin the postmaster and the processes it already forked; backends forked later inherit its mask."""
    if core is None:
        return
    for pid in [postmaster, *procs.children(postmaster)]:
        with contextlib.suppress(OSError):  # a helper process may exit meanwhile
            procs.pin(pid, {core})


def export_source(ref: str, folder: Path) -> Path:
    """The src/ tree of a git ref, to benchmark committed code while the working tree is being edited.
    (git archive only reads the repository: no checkout, no stash.)"""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def service_env(backends: Backends, secret: str, *, source: Path | None = None) -> dict[str, str]:
    """The servers' environment. With `source`, PYTHONPATH puts that tree's `preorder` ahead of the
    editable install of the working tree."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH", "")]))
    env.update({
        "PREORDER_ENV": "prod",
        "PREORDER_DATABASE_URL": backends.database_url,
        "PREORDER_REDIS_URL": backends.redis_url,
        "PREORDER_JWT_SECRET": secret,
        "PREORDER_RATE_LIMIT_PER_USER": NO_RATE_LIMIT,
        "PREORDER_RATE_LIMIT_PER_CLIENT": NO_RATE_LIMIT,
        "PREORDER_CUSTOMER_RATE_LIMIT": NO_RATE_LIMIT, "PREORDER_ADDRESS_RATE_LIMIT": NO_RATE_LIMIT,
        "PREORDER_MAX_UNPAID_PER_CUSTOMER": NO_RATE_LIMIT,
    })
    return env


def migrate(env: dict[str, str]) -> None:
    """`preorder migrate`, from the same code the service runs."""
    subprocess.run([str(BIN / "preorder"), "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)


def new_secret() -> str:
    return secrets.token_urlsafe(48)


def start_service(
    *, env: dict[str, str], cores: set[int], logs: Path, started: contextlib.ExitStack, workers: int = 1
) -> tuple[procs.Managed, str]:
    """`preorder serve` pinned to `cores`. With --workers 1 uvicorn serves in this very process (no supervisor),
    and taskset execs it, so the pid we hold is the server we measure and profile. With more, that pid is
    uvicorn's supervisor and the workers are its children (measured together: procs.family)."""
    port = free_port()
    argv = ["taskset", "-c", ",".join(map(str, sorted(cores))), str(BIN / "preorder"), "serve",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    name = "service" if workers == 1 else f"service-{workers}-workers"
    server, base = _start(name, argv, port=port, env=env, logs=logs, started=started)
    _wait_workers(server, workers)
    return server, base


def _wait_workers(server: procs.Managed, workers: int, timeout_s: float = 60) -> None:
    """/healthz answered by one worker says nothing of the others: wait until the log shows each one started."""
    deadline = time.monotonic() + timeout_s
    while server.log.read_text(errors="replace").count("Application startup complete") < workers:
        if time.monotonic() > deadline or not server.alive():
            raise RuntimeError(f"{server.name}: not all {workers} workers started:\n{procs.tail(server.log)}")
        time.sleep(0.1)


BARE_APPS = {"bare": "bench.bare_app:app", "bare+auth": "bench.bare_app:app_auth"}


def start_bare(
    name: str, *, env: dict[str, str], core: int, logs: Path, started: contextlib.ExitStack
) -> tuple[procs.Managed, str]:
    """One app of bench/bare_app.py (BARE_APPS) under the options `preorder serve` passes to uvicorn.run
    (see preorder.cli._serve)."""
    port = free_port()
    argv = ["taskset", "-c", str(core), str(BIN / "uvicorn"), BARE_APPS[name],
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--loop", "uvloop",
            "--http", "httptools", "--no-access-log", "--timeout-graceful-shutdown", "10"]
    return _start(name.replace("+", "-"), argv, port=port, env=env, logs=logs, started=started)


def _start(
    name: str, argv: list[str], *, port: int, env: dict[str, str], logs: Path, started: contextlib.ExitStack
) -> tuple[procs.Managed, str]:
    server = procs.spawn(name, argv, env=env, log=logs / f"{name}.log", cwd=ROOT)
    started.callback(server.stop)
    base = f"http://127.0.0.1:{port}"
    procs.wait_http(f"{base}/healthz", server)
    return server, base


# ---- seed data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """Product ids of this run (unique, so a reused external database does not mix runs) and the files
    the wrk script reads."""

    hot: str
    sold_out: str
    spread: list[str]
    tokens_file: Path
    files: dict[str, Path]  # products file per scenario

    @property
    def all_products(self) -> list[str]:
        return [self.hot, self.sold_out, *self.spread]

    @property
    def stock(self) -> dict[str, int]:
        return {self.hot: HOT_STOCK, self.sold_out: 0, **{p: SPREAD_STOCK for p in self.spread}}


HOT_STOCK = 10_000_000  # far more than any run can sell: the success path never runs out
SPREAD_STOCK = 1_000_000


def seed(base: str, *, folder: Path, secret: str, users: int, spread: int) -> Seed:
    tag = new_tag()
    s = Seed(hot=f"{tag}-hot", sold_out=f"{tag}-sold", spread=[f"{tag}-s{i:04d}" for i in range(spread)],
             tokens_file=folder / "tokens.txt",
             files={"bare": folder / "hot.txt", "bare+auth": folder / "hot.txt", "create": folder / "hot.txt",
                    "soldout": folder / "sold.txt", "spread": folder / "spread.txt", "workers2": folder / "hot.txt"})
    create_products(base, secret, s.stock)
    settings = Settings(env="dev", jwt_secret=secret)
    tokens = [mint_token(settings, sub=f"u{i:05d}", role="customer", ttl_s=86_400) for i in range(users)]
    write_lines(s.tokens_file, tokens)
    write_lines(s.files["create"], [s.hot])
    write_lines(s.files["soldout"], [s.sold_out])
    write_lines(s.files["spread"], s.spread)
    return s


def admin_token(secret: str) -> str:
    token: str = mint_token(Settings(env="dev", jwt_secret=secret), sub="bench-admin", role="admin", ttl_s=86_400)
    return token


def create_products(base: str, secret: str, stock: dict[str, int]) -> None:
    """Products through the API (so Redis is loaded the service's own way), with a payment window long enough
    that no bench order expires mid-run."""
    asyncio.run(_create_products(base, admin_token(secret), stock))


def new_tag() -> str:
    """A prefix for this run's product ids: a reused external database does not mix runs."""
    return f"b{time.time_ns() // 1_000_000:x}"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


async def _create_products(base: str, token: str, stock: dict[str, int]) -> None:
    gate = asyncio.Semaphore(8)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:

        async def create(product_id: str, units: int) -> None:
            body = {"id": product_id, "name": f"bench {product_id}", "price_amount": PRICE, "currency": "USD",
                    "total_stock": units, "payment_window_seconds": LONG_WINDOW_S}
            async with gate:
                answer = await client.post("/api/products", json=body)
            if answer.status_code != 201:
                raise RuntimeError(f"creating {product_id}: {answer.status_code} {answer.text}")

        await asyncio.gather(*(create(p, n) for p, n in stock.items()))
