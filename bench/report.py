"""Medians over rounds, the ratios against the targets of issue 5, the printed table, JSON and a PNG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load import WrkResult

MB = 1024 * 1024


@dataclass
class Run:
    """One wrk run of one scenario, with what the server process did meanwhile."""

    scenario: str
    round: int
    wrk: WrkResult
    server_rss_max_bytes: int
    server_cpu_s: float
    core_busy_pct: dict[int, float]
    foreign_cpu_pct: float  # CPU other processes on the machine used meanwhile, % of one core

    @property
    def server_cpu_pct(self) -> float:
        return 100 * self.server_cpu_s / self.wrk.duration_s

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.server_cpu_s / max(self.wrk.requests, 1)


@dataclass
class Summary:
    """Medians over the rounds of one scenario (min and max of throughput kept to show the spread)."""

    scenario: str
    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    server_cpu_pct: float
    cpu_us_per_request: float
    rss_max_mb: float
    foreign_cpu_pct: float
    answers: dict[str, int] = field(default_factory=dict)


def summarise(runs: list[Run], scenarios: list[str]) -> list[Summary]:
    out = []
    for name in scenarios:
        mine = [r for r in runs if r.scenario == name]
        if not mine:
            continue
        rps = [r.wrk.rps for r in mine]
        out.append(Summary(
            scenario=name, rps=statistics.median(rps), rps_min=min(rps), rps_max=max(rps),
            p50_ms=statistics.median(r.wrk.p50_ms for r in mine), p99_ms=statistics.median(r.wrk.p99_ms for r in mine),
            server_cpu_pct=statistics.median(r.server_cpu_pct for r in mine),
            cpu_us_per_request=statistics.median(r.cpu_us_per_request for r in mine),
            rss_max_mb=max(r.server_rss_max_bytes for r in mine) / MB,
            foreign_cpu_pct=statistics.median(r.foreign_cpu_pct for r in mine),
            answers={"201": sum(r.wrk.s201 for r in mine), "409": sum(r.wrk.s409 for r in mine),
                     "other": sum(r.wrk.sother + r.wrk.socket_errors + r.wrk.timeouts for r in mine)},
        ))
    return out


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    limit: float
    at_least: bool  # True: value >= limit passes; False: value < limit passes
    # For throughput ratios, the same ratio from the server's CPU per request (bare us / create us): it
    # hardly moves when other work on the machine steals time, so it cross-checks a noisy req/s ratio.
    by_cpu: float | None = None

    @property
    def ok(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.at_least else self.value < self.limit

    def line(self) -> str:
        if self.value is None:
            return f"  {self.name:<34} n/a"
        verdict = "ok" if self.ok else "MISSED"
        sign = ">=" if self.at_least else "<"
        cpu = f"   (by CPU per request {self.by_cpu:.2f})" if self.by_cpu is not None else ""
        return f"  {self.name:<34} {self.value:8.2f}   target {sign} {self.limit:g}   {verdict:<6}{cpu}"


def targets(summaries: list[Summary], *, service_rss_max_mb: float) -> list[Target]:
    by = {s.scenario: s for s in summaries}

    def ratio(a: str, b: str) -> float | None:
        return by[a].rps / by[b].rps if a in by and b in by and by[b].rps else None

    def cpu_ratio(a: str, b: str) -> float | None:
        return by[b].cpu_us_per_request / by[a].cpu_us_per_request if a in by and b in by else None

    def throughput(a: str, b: str, limit: float) -> Target:
        return Target(f"{a}/{b} throughput", ratio(a, b), limit, at_least=True, by_cpu=cpu_ratio(a, b))

    create_p99 = by["create"].p99_ms if "create" in by else None
    return [
        throughput("create", "bare", 0.5),
        throughput("soldout", "bare", 0.8),
        throughput("create", "spread", 0.9),
        Target("create p99 ms", create_p99, P99_TARGET_MS, at_least=False),
        Target("service worker RSS max MB", service_rss_max_mb or None, 150, at_least=False),
    ]


P99_TARGET_MS = 25


def info_lines(summaries: list[Summary]) -> list[str]:
    """The same ratios against `bare+auth` (the ceiling with the token check, which earlier rounds quoted
    their figures against): not targets, a bridge to those figures."""
    by = {s.scenario: s for s in summaries}
    lines = []
    for a in ("create", "soldout"):
        if a in by and "bare+auth" in by and by["bare+auth"].rps:
            cpu = by["bare+auth"].cpu_us_per_request / by[a].cpu_us_per_request if by[a].cpu_us_per_request else 0
            lines.append(f"  {a + '/bare+auth throughput':<34} {by[a].rps / by['bare+auth'].rps:8.2f}   "
                         f"(not a target: earlier rounds' ceiling)   (by CPU per request {cpu:.2f})")
    return lines


def workers_line(summaries: list[Summary], *, workers: int) -> str | None:
    """The create path with `workers` workers on both cores against one worker on one core. Not a target:
    on 2 cores shared with wrk, PostgreSQL and Redis it says what the second core's leftovers buy, and whether
    a request costs more CPU when processes share the work (see README "Scaling out")."""
    by = {s.scenario: s for s in summaries}
    one, many = by.get("create"), by.get("workers2")
    if one is None or many is None or not one.rps:
        return None
    return (f"  {workers} workers / 1 worker (create)   {many.rps / one.rps:8.2f}   throughput; CPU per request "
            f"{many.cpu_us_per_request:.0f} us vs {one.cpu_us_per_request:.0f} us, server CPU "
            f"{many.server_cpu_pct:.0f}% vs {one.server_cpu_pct:.0f}% of a core")


def table(summaries: list[Summary]) -> str:
    head = (f"{'scenario':<9} {'req/s':>9} {'(min..max)':>17} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU':>8} "
            f"{'CPU us/req':>10} {'RSS MB':>7} {'others':>6}  answers")
    rows = [head, "-" * len(head)]
    for s in summaries:
        spread = f"{s.rps_min:,.0f}..{s.rps_max:,.0f}"
        answers = " ".join(f"{k}:{v:,}" for k, v in s.answers.items())
        rows.append(f"{s.scenario:<9} {s.rps:>9,.0f} {spread:>17} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} "
                    f"{s.server_cpu_pct:>7.0f}% {s.cpu_us_per_request:>10.0f} {s.rss_max_mb:>7.1f} "
                    f"{s.foreign_cpu_pct:>5.0f}%  {answers}")
    return "\n".join(rows)


def write_json(path: Path, *, meta: dict[str, Any], runs: list[Run], summaries: list[Summary],
               goals: list[Target], checks: dict[str, Any], extras: dict[str, Any] | None = None) -> None:
    doc = {
        "meta": meta,
        "summary": [asdict(s) for s in summaries],
        "targets": [{**asdict(t), "ok": t.ok} for t in goals],
        "correctness": checks,
        "extras": extras or {},
        "runs": [{**asdict(r), "rps": r.wrk.rps, "server_cpu_pct": r.server_cpu_pct,
                  "cpu_us_per_request": r.cpu_us_per_request} for r in runs],
    }
    path.write_text(json.dumps(doc, indent=2, default=str))


def write_chart(path: Path, summaries: list[Summary], *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    names = [s.scenario for s in summaries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    errors = [[s.rps - s.rps_min for s in summaries], [s.rps_max - s.rps for s in summaries]]
    left.bar(names, [s.rps for s in summaries], yerr=errors, capsize=4, color="#4c72b0")
    left.set_title("throughput (median req/s, min..max)")
    for i, s in enumerate(summaries):
        left.annotate(f"{s.rps:,.0f}", (i, s.rps), ha="center", va="bottom", fontsize=8)
    right.bar(names, [s.p99_ms for s in summaries], color="#dd8452", label="p99")
    right.bar(names, [s.p50_ms for s in summaries], color="#55a868", label="p50")
    right.axhline(P99_TARGET_MS, color="red", linestyle="--", linewidth=1,
                  label=f"create p99 target ({P99_TARGET_MS} ms)")
    right.set_title("latency (median of rounds, ms)")
    right.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
