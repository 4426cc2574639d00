"""What a create waits for, read from a running benchmark: `python -m bench.waits --service URL --database URL`.

Run it while `make bench` drives create (e.g. `--scenarios create --rounds 1 --duration 40`); the benchmark prints
both URLs when it starts. Over one window (--seconds) it reads:
- the service's `/metrics` at both ends: orders/s, the mean time of a request, of the batched Redis call and of
  the group-commit INSERT, and their batch sizes;
- PostgreSQL's `pg_stat_io` at both ends: WAL writes and flushes (fsyncs) and their mean time;
- `pg_stat_activity` sampled every --every seconds: what the backends running the order INSERT were doing
  (running or waiting for the CPU shows as "CPU", then IO:WalSync, Lock:transactionid, ...).

It turns `track_wal_io_timing` on (ALTER SYSTEM, as a superuser), and with `--synchronous-commit off` turns
`synchronous_commit` off for the window and back on after: meant for the benchmark's own embedded PostgreSQL,
never for a database that matters."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import asyncpg
import httpx

from bench import service_metrics

# The mean of each (seconds are printed as ms), from the service's /metrics: a request of create's route, the batched
# Redis call and its asks, the group-commit INSERT and its rows.
_MEANS = {
    "request": "http_server_request_duration_seconds",
    "redis call": "preorder_reserve_script_duration_seconds",
    "asks per Redis call": "preorder_reserve_script_asks",
    "group-commit INSERT": "preorder_order_commit_duration_seconds",
    "rows per INSERT": "preorder_order_commit_batch_size",
}
_SAMPLES = {"created": "preorder_orders_created_total",
            **{f"{label}/sum": f"{name}_sum" for label, name in _MEANS.items()},
            **{f"{label}/count": f"{name}_count" for label, name in _MEANS.items()}}
_INSERT = "%INSERT INTO orders%"
_IO = ("SELECT COALESCE(sum(writes), 0)::float8, COALESCE(sum(write_time), 0)::float8, "
       "COALESCE(sum(fsyncs), 0)::float8, COALESCE(sum(fsync_time), 0)::float8 FROM pg_stat_io WHERE object = 'wal'")
_ACTIVITY = ("SELECT COALESCE(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity "
             "WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE $1")


@dataclass
class Reading:
    at: float
    service: dict[str, float]  # _SAMPLES, cumulative
    io: tuple[float, float, float, float]  # pg_stat_io's WAL writes, write ms, fsyncs, fsync ms, cumulative


async def _read(client: httpx.AsyncClient, conn: asyncpg.Connection, url: str) -> Reading:
    text = (await client.get(f"{url}/metrics")).text
    io = await conn.fetchrow(_IO)
    assert io is not None
    return Reading(time.monotonic(), service_metrics.sums(text, _SAMPLES, route="/api/preorder"),
                   (io[0], io[1], io[2], io[3]))


async def measure(service: str, database: str, *, seconds: float, every: float, synchronous_commit: str) -> None:
    conn = await asyncpg.connect(database)
    async with httpx.AsyncClient(timeout=10) as client:
        await conn.execute("ALTER SYSTEM SET track_wal_io_timing = on")
        if synchronous_commit == "off":
            await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        await conn.execute("SELECT pg_reload_conf()")
        try:
            await asyncio.sleep(1)  # backends take the new settings at their next statement
            before = await _read(client, conn, service)
            waits: Counter[str] = Counter()
            samples = 0
            while time.monotonic() - before.at < seconds:
                waits.update(r[0] for r in await conn.fetch(_ACTIVITY, _INSERT))
                samples += 1
                await asyncio.sleep(every)
            after = await _read(client, conn, service)
        finally:
            await conn.execute("ALTER SYSTEM RESET synchronous_commit")
            await conn.execute("SELECT pg_reload_conf()")
    await conn.close()
    _report(before, after, waits, samples, synchronous_commit)


def _report(before: Reading, after: Reading, waits: Counter[str], samples: int, synchronous_commit: str) -> None:
    span = after.at - before.at

    def delta(key: str) -> float:
        return after.service[key] - before.service[key]

    print(f"{span:.1f} s, synchronous_commit {synchronous_commit}: {delta('created') / span:,.0f} orders/s")
    for label, name in _MEANS.items():
        if delta(f"{label}/count"):
            mean = delta(f"{label}/sum") / delta(f"{label}/count")
            print(f"  {label:<22} {mean * 1000:8.2f} ms" if name.endswith("seconds") else f"  {label:<22} {mean:8.1f}")
    writes, write_ms, fsyncs, fsync_ms = (a - b for a, b in zip(after.io, before.io, strict=True))
    print(f"  WAL writes {writes:,.0f} ({write_ms / max(writes, 1):.3f} ms each), "
          f"flushes {fsyncs:,.0f} ({fsync_ms / max(fsyncs, 1):.3f} ms each, {fsync_ms / 1000 / span:.0%} of the time)")
    print(f"  order INSERT backends in {samples} samples of pg_stat_activity:")
    for wait, n in waits.most_common(8):
        print(f"    {n:6d}  {wait}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.waits", description=__doc__.split("\n\n")[0])
    p.add_argument("--service", required=True, help="the service's URL (`make bench` prints it: 'service up')")
    p.add_argument("--database", required=True, help="its PostgreSQL (`make bench` prints the embedded one's)")
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--every", type=float, default=0.02, help="seconds between pg_stat_activity samples")
    p.add_argument("--synchronous-commit", choices=("on", "off"), default="on",
                   help="off: turn synchronous_commit off for the window (and back on after)")
    a = p.parse_args()
    asyncio.run(measure(a.service, a.database, seconds=a.seconds, every=a.every,
                        synchronous_commit=a.synchronous_commit))


if __name__ == "__main__":
    main()
