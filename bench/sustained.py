"""The sustained scenario: --sustained-minutes (5) of create on one hot product, in a table that already holds
--sustained-seed (1,000,000) orders. Throughput per minute, and the last minute against the first (>= 0.9).

The seed is written with SQL (generate_series), in a state that keeps every invariant without touching Redis:

- its orders belong to --sustained-seed-products products of their own, made through the API (so Redis holds
  their counters, loaded the service's own way), with total_stock = the orders each gets;
- every order is `cancelled` by the system (payment window expired, 2 to 30 days ago), as the sweeper leaves
  a sale's unpaid orders: it holds no stock (products.sold, kept by the triggers on orders, stays 0, and Redis's
  `reserved` 0 agrees), owes and paid nothing (I6), is terminal (the sweeper never looks at it again), and
  has its two events, created and cancelled (I5), already relayed (before the relay's cursor: txid 0);
- ids are UUIDv7 of their creation time, as the service makes them, so they sort before the run's own;
- 20,000 customers of their own, so the load's customers start from empty counters;
- then VACUUM ANALYZE, as autovacuum would have done long before a sale: the run starts from a settled table.

Each step of --sustained-step seconds (60) is one wrk run, back to back; between steps the benchmark reads what
could explain a slowdown: the tables' live and dead rows, autovacuum runs and sizes (pg_stat_user_tables), the
hot product's Redis holds and fresh-holds set, Redis memory, and the CPU the server, PostgreSQL and Redis used.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from bench import procs, report, service_metrics, stack
from preorder.db import asyncpg_dsn
from preorder.stock.keys import product_keys

if TYPE_CHECKING:
    from bench.__main__ import Bench

TARGET = 0.9  # last step's throughput / first step's
SEED_USERS = 20_000


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sustained-minutes", type=float, default=5, help="length of the sustained run (default 5)")
    p.add_argument("--sustained-seed", type=int, default=1_000_000,
                   help="orders in the table before the sustained run (default 1,000,000)")
    p.add_argument("--sustained-seed-products", type=int, default=10, help="products the seeded orders belong to")
    p.add_argument("--sustained-step", type=float, default=60,
                   help="seconds per measured step of the sustained run (default 60: throughput per minute)")


_SEED_ORDERS = """
INSERT INTO orders (id, product_id, user_id, quantity, status, amount_due, currency, pay_by, created_at,
                    updated_at, balance_due, cancelled_by)
SELECT (lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || '7' || substr(h, 1, 3) || '8'
        || substr(h, 4, 15))::uuid,
       ($1::text[])[1 + i % cardinality($1::text[])], 'seed-u' || lpad((i % $3)::text, 6, '0'), 1, 'cancelled',
       $4::bigint, 'USD', at + interval '15 minutes', at, at + interval '15 minutes', $4::bigint, 'system'
FROM (SELECT i, md5($5 || i) AS h,
             now() - interval '30 days' + (i * (interval '28 days' / $2)) AS at
      FROM generate_series(1, $2::int) AS i) AS s
"""

_SEED_EVENTS = """
INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type, data, created_at,
                          txid)
SELECT o.id, e.from_status, e.to_status, e.actor, e.reason, e.sequence, e.to_status,
       to_jsonb(o) || jsonb_build_object('status', e.to_status, 'updated_at', e.at), e.at, '0'::xid8
FROM orders o
CROSS JOIN LATERAL (VALUES (NULL, 'pending', o.user_id, 'created', 1, o.created_at),
                           ('pending', 'cancelled', 'system', 'payment_timeout', 2, o.updated_at))
     AS e (from_status, to_status, actor, reason, sequence, at)
WHERE o.product_id = ANY($1::text[])
"""

# From the service's /metrics, summed over label sets: group commit (mean batch size and INSERT time per step)
# and the background loop's passes, to tell a slower commit from more background work.
_METRICS = {
    "commit_s": "preorder_order_commit_duration_seconds_sum", "commits": "preorder_order_commit_duration_seconds_count",
    "batched": "preorder_order_commit_batch_size_sum", "reconciles": "preorder_reconciler_passes_total",
    "sweeps": "preorder_sweeper_runs_total",
}

_TABLES = """
SELECT relname, n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count, n_tup_hot_upd, n_tup_upd,
       pg_total_relation_size(relid) AS bytes
FROM pg_stat_user_tables WHERE relname IN ('orders', 'order_events', 'products')
"""

# WAL written (full-page images after each checkpoint make it grow per commit) and checkpoints (PostgreSQL 17+)
_WAL = """
SELECT w.wal_records, w.wal_fpi, w.wal_bytes::bigint, c.num_timed + c.num_requested AS checkpoints,
       c.num_requested AS checkpoints_requested
FROM pg_stat_wal w, pg_stat_checkpointer c
"""


@dataclass
class Step:
    no: int
    run: report.Run
    pg_cpu_pct: float
    redis_cpu_pct: float
    tables: dict[str, dict[str, int]]
    redis: dict[str, int]
    wal: dict[str, int]  # cumulative since PostgreSQL started
    wal_before: dict[str, int]
    service: dict[str, float]  # cumulative, from /metrics (_METRICS)
    service_before: dict[str, float]

    def delta(self, name: str) -> float:
        return self.service.get(name, 0.0) - self.service_before.get(name, 0.0)

    def line(self) -> str:
        w, t, r = self.run.wrk, self.tables, self.redis
        o, e = t.get("orders", {}), t.get("order_events", {})
        wal_mb = (self.wal.get("wal_bytes", 0) - self.wal_before.get("wal_bytes", 0)) / report.MB
        fpi = self.wal.get("wal_fpi", 0) - self.wal_before.get("wal_fpi", 0)
        ckpt = self.wal.get("checkpoints", 0) - self.wal_before.get("checkpoints", 0)
        per_order = 1024 * wal_mb / max(w.s201, 1)
        commits = max(self.delta("commits"), 1)
        return (f"{w.rps:7,.0f} req/s p99 {w.p99_ms:6.1f} ms | server {self.run.server_cpu_pct:3.0f}% "
                f"{self.run.cpu_us_per_request:4.0f} us/req | commit {1000 * self.delta('commit_s') / commits:5.1f} ms "
                f"x {self.delta('batched') / commits:4.1f} rows, reconciles +{self.delta('reconciles'):.0f} | "
                f"WAL {wal_mb:5.0f} MB {per_order:4.1f} kB/order "
                f"FPI {fpi:,} ckpt +{ckpt} | "
                f"PG {self.pg_cpu_pct:3.0f}% Redis {self.redis_cpu_pct:3.0f}% | orders {o.get('n_live_tup', 0):,} "
                f"dead {o.get('n_dead_tup', 0):,} av {o.get('autovacuum_count', 0)} "
                f"{o.get('bytes', 0) / report.MB:,.0f} MB, events {e.get('bytes', 0) / report.MB:,.0f} MB "
                f"av {e.get('autovacuum_count', 0)} | holds {r['holds']:,} fresh {r['fresh']:,} "
                f"redis {r['used_memory'] / report.MB:,.0f} MB")


@dataclass
class SustainedResult:
    seeded: int
    seed_s: float
    step_s: float
    product: str
    steps: list[Step] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if len(self.steps) < 2 or not self.steps[0].run.wrk.rps:
            return None
        return self.steps[-1].run.wrk.rps / self.steps[0].run.wrk.rps

    @property
    def ok(self) -> bool:
        return self.ratio is None or self.ratio >= TARGET

    def lines(self) -> list[str]:
        out = [f"  {self.seeded:,} orders seeded in {self.seed_s:.0f} s; create on {self.product}, "
               f"{len(self.steps)} steps of {self.step_s:g} s"]
        out += [f"  step {s.no:>2}  {s.line()}" for s in self.steps]
        if self.ratio is not None:
            verdict = "ok" if self.ok else "MISSED"
            out.append(f"  {'last/first step throughput':<34} {self.ratio:8.2f}   target >= {TARGET:g}   {verdict}")
        return out

    def as_json(self) -> dict[str, Any]:
        return {"seeded": self.seeded, "seed_s": self.seed_s, "step_s": self.step_s, "product": self.product,
                "ratio_last_first": self.ratio, "ok": self.ok,
                "steps": [{"step": s.no, "rps": s.run.wrk.rps, "p50_ms": s.run.wrk.p50_ms, "p99_ms": s.run.wrk.p99_ms,
                           "server_cpu_pct": s.run.server_cpu_pct, "cpu_us_per_request": s.run.cpu_us_per_request,
                           "pg_cpu_pct": s.pg_cpu_pct, "redis_cpu_pct": s.redis_cpu_pct, "tables": s.tables,
                           "wal": s.wal, "wal_before": s.wal_before, "service": s.service,
                           "service_before": s.service_before,
                           "redis": s.redis, "answers": {"201": s.run.wrk.s201, "409": s.run.wrk.s409}}
                          for s in self.steps]}


def run(bench: Bench, *, logs: Path) -> SustainedResult:
    args, backends = bench.args, bench.backends
    assert backends is not None  # --url refuses the scenario: the seed needs the database
    base = bench.servers["sustained"][1]
    tag = stack.new_tag()
    per_product = -(-args.sustained_seed // args.sustained_seed_products)
    history = [f"{tag}-hist{i:02d}" for i in range(args.sustained_seed_products)]
    hot = f"{tag}-sustained"
    stack.create_products(base, bench.secret, {**{p: per_product for p in history}, hot: stack.HOT_STOCK})
    bench.extra_products += [*history, hot]
    bench.say(f"sustained: seeding {args.sustained_seed:,} orders over {len(history)} products with SQL")
    t0 = time.monotonic()
    asyncio.run(_seed(backends.database_url, history, orders=args.sustained_seed, tag=tag))
    bench.seeded += args.sustained_seed
    result = SustainedResult(args.sustained_seed, time.monotonic() - t0, args.sustained_step, hot)
    bench.say(f"sustained: seeded and vacuumed in {result.seed_s:.0f} s")
    products = stack.write_lines(bench.folder / "sustained-product.txt", [hot])
    steps = max(round(args.sustained_minutes * 60 / args.sustained_step), 1)
    wal0 = asyncio.run(_probe(backends.database_url, backends.redis_url, hot))[2]
    service0 = _scrape(base)
    for no in range(1, steps + 1):
        pg0, redis0 = _cpu(backends.pids(), backends.redis_pid)
        run = bench.measure("sustained", round_no=no, duration_s=args.sustained_step, products_file=products,
                            settle_s=0)
        assert run is not None  # no --max-orders cap locally unless asked
        pg1, redis1 = _cpu(backends.pids(), backends.redis_pid)
        tables, redis, wal = asyncio.run(_probe(backends.database_url, backends.redis_url, hot))
        wall = run.wrk.duration_s
        previous = result.steps[-1] if result.steps else None
        step = Step(no, run, 100 * (pg1 - pg0) / wall, 100 * (redis1 - redis0) / wall, tables, redis, wal,
                    previous.wal if previous else wal0, _scrape(base), previous.service if previous else service0)
        result.steps.append(step)
        bench.say(f"sustained step {no}/{steps}: {step.line()}")
    return result


def _scrape(base: str) -> dict[str, float]:
    return service_metrics.sums(httpx.get(f"{base}/metrics", timeout=10).text, _METRICS)


def _cpu(pids: list[int], redis_pid: int | None) -> tuple[float, float]:
    """CPU seconds of PostgreSQL's processes (the postmaster and its children now) and of Redis."""
    used = procs.cpu_of(pids)
    redis = used.pop(redis_pid, 0.0) if redis_pid else 0.0
    return sum(used.values()), redis


async def _seed(database_url: str, products: list[str], *, orders: int, tag: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with conn.transaction():
            await conn.execute(_SEED_ORDERS, products, orders, SEED_USERS, stack.PRICE, tag)
            await conn.execute(_SEED_EVENTS, products)
        await conn.execute("VACUUM (ANALYZE) orders, order_events, products")
    finally:
        await conn.close()


async def _probe(database_url: str, redis_url: str, product: str
                 ) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, int]]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    client = aioredis.Redis.from_url(redis_url)
    try:
        tables = {r["relname"]: {k: int(v) for k, v in dict(r).items() if k != "relname"}
                  for r in await conn.fetch(_TABLES)}
        keys = product_keys(product)
        memory = await client.info("memory")
        redis = {"holds": int(await client.hlen(keys.holds)), "fresh": int(await client.zcard(keys.fresh)),
                 "keys": int(await client.dbsize()), "used_memory": int(memory["used_memory"])}
        row = await conn.fetchrow(_WAL)
        wal = {k: int(v) for k, v in dict(row).items()} if row else {}
        return tables, redis, wal
    finally:
        await client.aclose()
        await conn.close()
