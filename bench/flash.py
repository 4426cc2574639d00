"""The flash-sale scenario (`flash`: the one-worker service; `flash2`: the service with 2 workers on both cores).

--flash-requests POSTs (2,000,000) at 64 connections for one fresh product of --flash-stock units (10,000), in two
wrk runs on the same connections count:

1. until the first 409: the stock is gone. Its length (first POST sent to first 409 answered) is the time to sell
   out and its latency the p99 before sell-out. Its POSTs in flight at that moment are answered before it ends.
2. the rest of the --flash-requests: refusals only, the p99 after sell-out.

wrk never sends more than asked: the cap is counted as request() builds each POST (bench/wrk/preorder.lua).
Locally the check is exact: PostgreSQL holds exactly --flash-stock orders of the product, wrk saw exactly that
many 201s, and every other answer was a 409.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from bench import stack
from bench.load import WrkResult
from preorder.db import asyncpg_dsn

if TYPE_CHECKING:
    from bench.__main__ import Bench


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flash-requests", type=int, default=2_000_000,
                   help="POSTs of the flash and flash2 scenarios (default 2,000,000)")
    p.add_argument("--flash-stock", type=int, default=10_000,
                   help="units of the flash sale's product (default 10,000; with --url: what --product holds)")
    p.add_argument("--flash-timeout", type=float, default=1800,
                   help="seconds each flash phase may take at most (default 1800)")


@dataclass
class FlashResult:
    scenario: str
    workers: int
    connections: int
    product: str
    requests: int  # asked for
    stock: int
    before: WrkResult  # until the first 409
    after: WrkResult | None  # the rest
    orders_in_pg: int | None  # None: no database access (--url)
    server_cpu_pct: tuple[float, float]  # before, after

    @property
    def phases(self) -> list[WrkResult]:
        return [self.before] + ([self.after] if self.after else [])

    @property
    def sent(self) -> int:
        return sum(w.sent for w in self.phases)

    @property
    def answers(self) -> dict[str, int]:
        return {"201": sum(w.s201 for w in self.phases), "409": sum(w.s409 for w in self.phases),
                "other": sum(w.sother + w.socket_errors + w.timeouts for w in self.phases)}

    @property
    def sold_out_s(self) -> float | None:
        return self.before.until_409_s

    @property
    def total_s(self) -> float:
        """From the first POST sent to the last one answered, over both phases (CLOCK_MONOTONIC of wrk)."""
        last = self.after.t_last_us if self.after else self.before.t_last_us
        return (last - self.before.t_first_us) / 1e6

    @property
    def checks(self) -> list[tuple[str, bool]]:
        a = self.answers
        found = [
            (f"POSTs sent {self.sent:,} == asked {self.requests:,}", self.sent == self.requests),
            (f"every POST answered: 201 + 409 + other = {sum(a.values()):,}", sum(a.values()) == self.sent),
            (f"answers other than 201/409 (and socket errors, timeouts): {a['other']:,}", a["other"] == 0),
            (f"sold out (a 409 seen): {'yes' if self.sold_out_s is not None else 'no'}", self.sold_out_s is not None),
        ]
        if self.orders_in_pg is not None:
            found += [
                (f"orders in PostgreSQL {self.orders_in_pg:,} == stock {self.stock:,}",
                 self.orders_in_pg == self.stock),
                (f"201s seen {a['201']:,} == stock {self.stock:,}", a["201"] == self.stock),
            ]
        else:
            found.append((f"201s seen {a['201']:,} <= stock {self.stock:,} (orders in PostgreSQL: not checked, "
                          f"--url)", a["201"] <= self.stock))
        return found

    @property
    def ok(self) -> bool:
        return all(ok for _, ok in self.checks)

    def lines(self) -> list[str]:
        b, a = self.before, self.after
        sold = f"{self.sold_out_s:.2f} s" if self.sold_out_s is not None else "never"
        out = [
            f"  {self.requests:,} POSTs for {self.stock:,} units of {self.product}, {self.workers} worker(s), "
            f"{self.connections} connections",
            f"  time to sell out          {sold}   ({b.s201:,} 201s, {b.requests:,} answers, "
            f"{b.requests / max(b.active_s, 1e-9):,.0f} req/s, server CPU {self.server_cpu_pct[0]:.0f}%)",
            f"  p99 before sell-out       {b.p99_ms:8.2f} ms   (p50 {b.p50_ms:.2f} ms, max {b.max_ms:.0f} ms)",
        ]
        if a is not None:
            out += [
                f"  p99 after sell-out        {a.p99_ms:8.2f} ms   (p50 {a.p50_ms:.2f} ms, max {a.max_ms:.0f} ms, "
                f"{a.requests / max(a.active_s, 1e-9):,.0f} req/s, server CPU {self.server_cpu_pct[1]:.0f}%)",
            ]
        out.append(f"  total run time            {self.total_s:.1f} s   (first POST sent to last answered)")
        out += [f"  {'ok    ' if ok else 'FAILED'} {text}" for text, ok in self.checks]
        return out

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "workers": self.workers, "connections": self.connections,
                "product": self.product,
                "requests": self.requests, "stock": self.stock, "sold_out_s": self.sold_out_s,
                "p99_before_ms": self.before.p99_ms, "p99_after_ms": self.after.p99_ms if self.after else None,
                "total_s": self.total_s, "orders_in_pg": self.orders_in_pg, "answers": self.answers,
                "ok": self.ok, "checks": [{"check": t, "ok": ok} for t, ok in self.checks],
                "before": vars(self.before), "after": vars(self.after) if self.after else None}


def run(bench: Bench, scenario: str, *, workers: int) -> FlashResult:
    args = bench.args
    if bench.remote:
        product = args.product
    else:
        product = f"{stack.new_tag()}-{scenario}"
        stack.create_products(bench.servers[scenario][1], bench.secret, {product: args.flash_stock})
        bench.extra_products.append(product)
    products = stack.write_lines(bench.folder / f"{scenario}-product.txt", [product])
    bench.say(f"{scenario}: {args.flash_requests:,} POSTs for {args.flash_stock:,} units of {product}")
    before = bench.measure(scenario, round_no=1, duration_s=args.flash_timeout, products_file=products,
                           max_requests=args.flash_requests, stop_on_409=True, settle_s=0)
    if before is None:
        raise SystemExit(f"{scenario}: --max-orders leaves nothing to send")
    bench.say(f"{scenario} until sold out: {_line(before.wrk)}")
    left = args.flash_requests - before.wrk.sent
    after = None
    if left > 0:
        after = bench.measure(scenario, round_no=2, duration_s=args.flash_timeout, products_file=products,
                              max_requests=left)
        if after is not None:
            bench.say(f"{scenario} after sell-out: {_line(after.wrk)}")
    orders = None if bench.backends is None else asyncio.run(_orders_of(bench.backends.database_url, product))
    return FlashResult(scenario, workers, args.connections, product, args.flash_requests, args.flash_stock, before.wrk,
                       after.wrk if after else None, orders,
                       (before.server_cpu_pct, after.server_cpu_pct if after else 0.0))


def _line(w: WrkResult) -> str:
    return (f"{w.sent:,} sent, 201:{w.s201:,} 409:{w.s409:,} other:{w.sother + w.socket_errors + w.timeouts:,} "
            f"in {w.active_s:.2f} s, p99 {w.p99_ms:.2f} ms")


async def _orders_of(database_url: str, product: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM orders WHERE product_id = $1", product))
    finally:
        await conn.close()
