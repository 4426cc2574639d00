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
from prometheus_client.parser import text_string_to_metric_families

# name of the histogram or counter -> (sum, count) or value, summed over label sets (create's route only)
_WANTED = {
    "http_server_request_duration_seconds": "request",
    "preorder_reserve_script_duration_seconds": "redis call",
    "preorder_reserve_script_asks": "asks per Redis call",
    "preorder_order_commit_duration_seconds": "group-commit INSERT",
    "preorder_order_commit_batch_size": "rows per INSERT",
}
_INSERT = "%INSERT INTO orders%"
_IO = ("SELECT COALESCE(sum(writes), 0)::float8, COALESCE(sum(write_time), 0)::float8, "
       "COALESCE(sum(fsyncs), 0)::float8, COALESCE(sum(fsync_time), 0)::float8 FROM pg_stat_io WHERE object = 'wal'")
_ACTIVITY = ("SELECT COALESCE(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity "
             "WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE $1")


@dataclass
class Reading:
    at: float
    sums: dict[str, tuple[float, float]]
    created: float
    io: tuple[float, float, float, float]


async def _metrics(client: httpx.AsyncClient, url: str) -> tuple[dict[str, tuple[float, float]], float]:
    text = (await client.get(f"{url}/metrics")).text
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in _WANTED}
    created = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "preorder_orders_created_total":
                created += sample.value
            base, _, part = sample.name.rpartition("_")
            if base in sums and part in ("sum", "count"):
                if base.startswith("http_") and sample.labels.get("route") != "/api/preorder":
                    continue
                sums[base][0 if part == "sum" else 1] += sample.value
    return {k: (v[0], v[1]) for k, v in sums.items()}, created


async def _read(client: httpx.AsyncClient, conn: asyncpg.Connection, url: str) -> Reading:
    sums, created = await _metrics(client, url)
    io = await conn.fetchrow(_IO)
    assert io is not None
    return Reading(time.monotonic(), sums, created, (io[0], io[1], io[2], io[3]))


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
    print(f"{span:.1f} s, synchronous_commit {synchronous_commit}: {(after.created - before.created) / span:,.0f} "
          "orders/s")
    for name, label in _WANTED.items():
        total = after.sums[name][0] - before.sums[name][0]
        count = after.sums[name][1] - before.sums[name][1]
        if count:
            mean = total / count
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
