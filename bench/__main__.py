"""`make bench` / `python -m bench`: throughput and latency of POST /api/preorder against real PostgreSQL and
Redis, the service as a real `preorder serve` process on one core, wrk on another. See bench/README.md."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench import checks, flash, load, procs, remote, report, stack, sustained, webhook
from bench import profile as prof

SCENARIOS = ["bare", "bare+auth", "create", "soldout", "spread", "workers2"]  # the default: interleaved rounds
# Run only when named, after the rounds, each once (they take minutes at their defaults): see flash.py, sustained.py
EXTRA = ["flash", "flash2", "sustained"]
WORKERS2 = 2  # the workers of the `workers2` scenario's server (create on the hot product, on both cores)
PROFILED = ["bare", "create", "soldout"]  # bare: the framework ceiling to compare the others with
BARE = ["bare", "bare+auth"]  # local apps without I/O: not the service, no orders
REMOTE = ["create", "soldout", "spread", "flash"]  # what --url can run against a deployment


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=64, help="open wrk connections (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every scenario (default 3)")
    p.add_argument("--warmup", type=float, default=3, help="seconds of unrecorded load per scenario first")
    p.add_argument("--quick", action="store_true", help="smoke check: 1 round of 2 s, 1 s warm-up")
    p.add_argument("--scenarios", default=None,
                   help=f"comma-separated, of {','.join(SCENARIOS + EXTRA)} (default {','.join(SCENARIOS)}; "
                        f"with --url: those of {','.join(REMOTE)} whose products are given)")
    p.add_argument("--users", type=int, default=2000, help="customer tokens the load rotates over")
    p.add_argument("--spread-products", type=int, default=1000, help="products of the spread scenario")
    p.add_argument("--server-core", type=int, default=0, help="core of the server under test")
    p.add_argument("--load-core", type=int, default=1, help="core of wrk, the driver and (embedded) PG + Redis")
    p.add_argument("--no-pin-backends", action="store_true", help="let PostgreSQL and Redis float over all cores")
    p.add_argument("--max-foreign-cpu", type=float, default=25,
                   help="%% of a core other processes may use during a run before it is run again (default 25)")
    p.add_argument("--retries", type=int, default=1, help="re-runs of a run that other processes disturbed")
    p.add_argument("--quiet-wait", type=float, default=10,
                   help="seconds to wait, before each run, for the machine to be idle (default 10)")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, py-spy the servers under bare, create and soldout")
    p.add_argument("--profile-duration", type=float, default=10, help="seconds of py-spy sampling per scenario")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra setting for both servers, e.g. PREORDER_DB_POOL_MAX=20 (repeatable)")
    p.add_argument("--ref", help="benchmark this git ref's src/ (e.g. HEAD) instead of the working tree")
    p.add_argument("--out", default="results", help="folder for JSON, PNG, profiles and logs (git-ignored)")
    p.add_argument("--webhook", action="store_true",
                   help="register one webhook endpoint (a receiver in this process) so the relay delivers every "
                        "event; each run starts once the last one's events are all delivered")
    p.add_argument("--max-orders", type=int, default=None,
                   help="at most this many POSTs over the whole benchmark, warm-up included, counted as they are "
                        "sent (so no order beyond it can be created); required with --url")
    flash.add_options(p)
    sustained.add_options(p)
    remote.add_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup, args.profile_duration = 2, 1, 1, 3
    if any("=" not in item for item in args.env):
        p.error("--env takes NAME=VALUE")
    if args.max_orders is not None and args.max_orders < 0:
        p.error("--max-orders must be >= 0")
    if args.url:
        remote.check_options(p, args, allowed=REMOTE)
    else:
        args.scenarios = [s for s in (args.scenarios or ",".join(SCENARIOS)).split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS + EXTRA)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    args.rounds_scenarios = [s for s in args.scenarios if s in SCENARIOS]
    return args


class Progress:
    """One line per step, with the time since the start: enough to see it is moving and where time goes."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {message}", flush=True)


@dataclass
class Ledger:
    """Every wrk run against the service (warm-up and profiling too): what the correctness check needs."""

    connections: int
    max_orders: int | None = None  # --max-orders: POSTs the whole benchmark may still send (None: no cap)
    created_201: int = 0
    unexpected: int = 0
    runs: int = 0
    rss_max_bytes: int = 0
    loaded_s: float = 0.0
    sent: int = 0  # POSTs sent to the service, answered or not

    def add(self, run: report.Run) -> None:
        w = run.wrk
        self.created_201 += w.s201
        self.unexpected += w.sother + w.socket_errors + w.timeouts
        self.runs += 1
        self.rss_max_bytes = max(self.rss_max_bytes, run.server_rss_max_bytes)
        self.loaded_s += w.duration_s
        self.sent += w.sent

    def budget(self, wanted: int | None) -> int | None:
        """How many POSTs the next run may send: what it wants, within what --max-orders leaves."""
        if self.max_orders is None:
            return wanted
        left = max(self.max_orders - self.sent, 0)
        return left if wanted is None else min(wanted, left)


@dataclass
class Bench:
    """The running system: servers, where they listen, the seed, and the options."""

    args: argparse.Namespace
    backends: stack.Backends | None  # None with --url: no database access
    servers: dict[str, tuple[procs.Managed | None, str]]  # scenario -> (server process or None with --url, base url)
    seed: stack.Seed
    logs: Path
    ledger: Ledger
    say: Progress
    code: dict[str, Any]  # the commit and uncommitted changes the servers were started from
    secret: str = ""  # the servers' JWT secret (local only): admin tokens for products made later
    folder: Path = Path(".")  # the run's temporary folder (token and product files)
    receiver: webhook.Receiver | None = None  # --webhook: the endpoint's receiver
    runs: list[report.Run] = field(default_factory=list)
    extra_products: list[str] = field(default_factory=list)  # made after the seed (flash, sustained): checked too
    seeded: int = 0  # orders written with SQL (sustained): in PostgreSQL, but no 201 was answered for them

    @property
    def remote(self) -> bool:
        return self.backends is None

    def run(self, scenario: str, *, round_no: int, duration_s: float) -> report.Run | None:
        """One measured run; run again (up to --retries) when other processes on the machine disturbed it.
        None when --max-orders leaves nothing to send."""
        for attempt in range(self.args.retries + 1):
            if not self.remote:
                if self.receiver is not None:  # the relay catching up on the last run's events: not in this one
                    webhook.wait_delivered(self.servers["create"][1], self.receiver)
                procs.wait_quiet(max_busy_pct=self.args.max_foreign_cpu, max_wait_s=self.args.quiet_wait)
            run = self.measure(scenario, round_no=round_no, duration_s=duration_s)
            if run is None or self.remote:
                return run
            if run.foreign_cpu_pct <= self.args.max_foreign_cpu or attempt == self.args.retries:
                return run
            self.say(f"  {scenario} disturbed (other processes used {run.foreign_cpu_pct:.0f}% of a core): again")
        raise AssertionError("unreachable")

    def measure(self, scenario: str, *, round_no: int, duration_s: float, server: str | None = None,
                products_file: Path | None = None, max_requests: int | None = None, stop_on_409: bool = False,
                settle_s: float = 1.0) -> report.Run | None:
        """One wrk run of `scenario` against the server of `server` (default: the scenario's own). None (and no
        run) when --max-orders leaves no POST to send."""
        process, url = self.servers[server or scenario]
        orders = scenario not in BARE
        if orders:
            max_requests = self.ledger.budget(max_requests)
            if max_requests == 0:
                self.say(f"  {scenario}: skipped, --max-orders ({self.ledger.max_orders:,}) is used up")
                return None
        spec = load.LoadSpec(url=url, products_file=products_file or self.seed.files[scenario],
                             tokens_file=self.seed.tokens_file, duration_s=duration_s,
                             connections=self.args.connections, core=-1 if self.remote else self.args.load_core,
                             max_requests=max_requests, stop_on_409=stop_on_409)
        log = self.logs / f"wrk-{scenario}.log"
        if process is None:
            result, usage = load.run_wrk(spec, log=log), procs.Usage()
        else:
            with procs.sampled(process.pid, ours=self.our_pids) as usage:
                result = load.run_wrk(spec, log=log)
        run = report.Run(scenario, round_no, result, usage.rss_max_bytes, usage.cpu_s, usage.core_busy_pct,
                         usage.foreign_cpu_pct)
        if orders:
            self.ledger.add(run)  # every run, kept or not: its orders are in PostgreSQL
        time.sleep(settle_s)  # let the server finish what wrk abandoned at its deadline before the next run
        return run

    def our_pids(self) -> list[int]:
        servers = {pid for server, _ in self.servers.values() if server for pid in procs.family(server.pid)}
        return [*servers, *(self.backends.pids() if self.backends else [])]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    say = Progress()
    signal.signal(signal.SIGTERM, _interrupt)  # a plain kill also goes through the cleanup below
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # ExitStack closes before the temporary folder is removed: servers stop before their data goes.
    with tempfile.TemporaryDirectory(prefix="preorder-bench-") as tmp, contextlib.ExitStack() as started:
        try:
            return _bench(args, folder=Path(tmp), out=out, stamp=stamp, started=started, say=say)
        except KeyboardInterrupt:
            say("interrupted: stopping every process the benchmark started")
            return 130
        finally:
            say("stopping servers")


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _bench(args: argparse.Namespace, *, folder: Path, out: Path, stamp: str, started: contextlib.ExitStack,
           say: Progress) -> int:
    if not args.url:
        os.sched_setaffinity(0, {args.load_core})  # the driver and its samplers stay off the server core
    say(f"wrk: {load.ensure_wrk()}")
    logs = out / f"bench-{stamp}-logs"
    if args.url:
        bench = _start_remote(args, folder=folder, logs=logs, say=say)
    else:
        bench = _start(args, folder=folder, logs=logs, started=started, say=say)
    _warm_up(bench)
    for round_no in range(1, args.rounds + 1 if args.rounds_scenarios else 1):
        for scenario in args.rounds_scenarios:
            run = bench.run(scenario, round_no=round_no, duration_s=args.duration)
            if run is not None:
                bench.runs.append(run)
                say(f"round {round_no}/{args.rounds} {scenario:<9} {run_line(run)}")
    if bench.receiver is not None and bench.runs:
        say(webhook.wait_delivered(bench.servers["create"][1], bench.receiver))
    if args.profile and not bench.remote:
        _profile(bench, out=out)
    extras: dict[str, Any] = {}
    for scenario in [s for s in args.scenarios if s in ("flash", "flash2")]:
        extras[scenario] = flash.run(bench, scenario, workers=WORKERS2 if scenario == "flash2" else 1)
    if "sustained" in args.scenarios:
        extras["sustained"] = sustained.run(bench, logs=logs)
    return _finish(bench, out=out, stamp=stamp, extras=extras)


def _start(args: argparse.Namespace, *, folder: Path, logs: Path, started: contextlib.ExitStack,
           say: Progress) -> Bench:
    logs.mkdir(parents=True, exist_ok=True)
    backends = stack.start_backends(folder, started, core=None if args.no_pin_backends else args.load_core)
    source = stack.export_source(args.ref, folder / "code") if args.ref else None
    env = stack.service_env(backends, stack.new_secret(), source=source)
    env.update(dict(item.split("=", 1) for item in args.env))
    if args.webhook:
        env["PREORDER_WEBHOOK_ALLOW_PRIVATE"] = "true"  # the receiver listens on 127.0.0.1
    stack.migrate(env)
    say(f"PostgreSQL and Redis ready ({'embedded' if backends.embedded else 'from the environment'}), migrated")
    if backends.embedded:  # for `python -m bench.waits` during a run (a URL from the environment may hold a password)
        say(f"embedded PostgreSQL at {backends.database_url}")
    code = _code_version(args.ref)  # read as the servers import the code: the working tree may change later
    service = stack.start_service(env=env, cores={args.server_core}, logs=logs, started=started)
    say(f"service up: pid {service[0].pid} at {service[1]} on core {args.server_core}")
    servers: dict[str, tuple[procs.Managed | None, str]] = {
        s: service for s in [*SCENARIOS, *EXTRA] if s not in ("workers2", "flash2", *BARE)}
    for name in [b for b in BARE if b in args.scenarios]:
        bare = servers[name] = stack.start_bare(name, env=env, core=args.server_core, logs=logs, started=started)
        say(f"{name} app up: pid {bare[0].pid} at {bare[1]} on core {args.server_core}")
    if {"workers2", "flash2"} & set(args.scenarios):
        # Two workers pinned to one core would only add a second process's overhead: they get both cores,
        # which they share with wrk, PostgreSQL and Redis (README "Scaling out": what this can and can't show).
        cores = {args.server_core, args.load_core}
        two = stack.start_service(env=env, cores=cores, logs=logs, started=started, workers=WORKERS2)
        servers["workers2"] = servers["flash2"] = two
        say(f"service with {WORKERS2} workers up: pid {two[0].pid} at {two[1]} "
            f"on cores {','.join(map(str, sorted(cores)))}")
    receiver = None
    if args.webhook:
        receiver = webhook.Receiver().start()
        started.callback(lambda: say(f"webhook receiver: {receiver.deliveries:,} deliveries, {receiver.cpu_s:.1f} s of "
                                     f"CPU ({receiver.cpu_s / max(receiver.deliveries, 1) * 1e6:.0f} us each)"))
        started.callback(receiver.stop)
        endpoint = webhook.register(service[1], env["PREORDER_JWT_SECRET"], receiver.url)
        say(f"webhook endpoint {endpoint} -> {receiver.url}: the relay delivers every event")
    seed = stack.seed(service[1], folder=folder, secret=env["PREORDER_JWT_SECRET"], users=args.users,
                      spread=args.spread_products)
    say(f"seeded {len(seed.all_products):,} products and {args.users:,} customer tokens")
    return Bench(args, backends, servers, seed, logs, Ledger(args.connections, args.max_orders), say, code,
                 secret=env["PREORDER_JWT_SECRET"], folder=folder, receiver=receiver)


def _start_remote(args: argparse.Namespace, *, folder: Path, logs: Path, say: Progress) -> Bench:
    """--url: a deployment someone else runs. Nothing is started here, nothing is seeded: the tokens and the
    product ids come from the options."""
    logs.mkdir(parents=True, exist_ok=True)
    seed = remote.seed(args, folder=folder)
    say(f"target {args.url}: {len(seed.tokens)} token(s), scenarios {','.join(args.scenarios)}, "
        f"at most {args.max_orders:,} POSTs in all (--max-orders)")
    servers: dict[str, tuple[procs.Managed | None, str]] = {s: (None, args.url) for s in args.scenarios}
    return Bench(args, None, servers, seed.seed, logs, Ledger(args.connections, args.max_orders), say,
                 {"commit": "n/a (--url)", "uncommitted": [], "url": args.url}, folder=folder)


def _warm_up(bench: Bench) -> None:
    """Unrecorded load first: connection pools filled, caches and allocator in their steady state."""
    if bench.args.warmup <= 0:
        return
    for scenario in bench.args.rounds_scenarios:
        run = bench.run(scenario, round_no=0, duration_s=bench.args.warmup)
        if run is not None:
            bench.say(f"warm-up  {scenario:<9} {run_line(run)}")


def run_line(run: report.Run) -> str:
    w = run.wrk
    cores = " ".join(f"core{c} {p:.0f}%" for c, p in sorted(run.core_busy_pct.items()))
    odd = f" other:{w.sother}({w.other_codes}) sock:{w.socket_errors} timeout:{w.timeouts}" if (
        w.sother or w.socket_errors or w.timeouts) else ""
    line = (f"{w.rps:8,.0f} req/s  p50 {w.p50_ms:6.2f} ms  p99 {w.p99_ms:6.2f} ms  "
            f"201:{w.s201:,} 409:{w.s409:,}{odd}")
    if not run.core_busy_pct:  # --url: nothing of the server is seen from here
        return line
    return (f"{line}  server CPU {run.server_cpu_pct:.0f}%  "
            f"RSS {run.server_rss_max_bytes / report.MB:.0f} MB  [{cores}, others {run.foreign_cpu_pct:.0f}%]")


def _profile(bench: Bench, *, out: Path) -> None:
    py_spy = prof.find_py_spy()
    if py_spy is None:
        bench.say("py-spy not found: skipping the profile (uv pip install py-spy)")
        return
    seconds = bench.args.profile_duration
    for scenario in [s for s in PROFILED if s in bench.args.scenarios]:
        server = bench.servers[scenario][0]
        assert server is not None  # profiling is local only
        for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            path = out / f"profile-{scenario}.{suffix}"
            recorder = prof.start_record(py_spy, pid=server.pid, out=path, fmt=fmt, duration_s=seconds)
            try:
                # measured once (py-spy samples one window), and wrk outlasts that window
                measured = bench.measure(scenario, round_no=-1, duration_s=seconds + 1)
                _, err = recorder.communicate(timeout=30)
                if measured is None:
                    return
                run = measured
            finally:
                if recorder.poll() is None:
                    recorder.kill()
            if recorder.returncode != 0:
                bench.say(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
                return
            bench.say(f"profile written: {path} ({run_line(run)})")
        summary = out / f"profile-{scenario}-summary.txt"
        text = prof.summarise(out / f"profile-{scenario}.txt", rps=run.wrk.rps,
                              cpu_us_per_request=run.cpu_us_per_request)
        summary.write_text(text + "\n")
        bench.say(f"profile summary: {summary}")


def _finish(bench: Bench, *, out: Path, stamp: str, extras: dict[str, Any]) -> int:
    args, ledger = bench.args, bench.ledger
    summaries = report.summarise(bench.runs, args.rounds_scenarios)
    goals = report.targets(summaries, service_rss_max_mb=ledger.rss_max_bytes / report.MB)
    if summaries:
        print()
        print(report.table(summaries))
        print("\nratios and targets (against `bare`, the framework's ceiling):")
        print("\n".join(t.line() for t in goals))
        print("\n".join(report.info_lines(summaries)))
        scaling = report.workers_line(summaries, workers=WORKERS2)
        if scaling:
            print(scaling)
        if not bench.remote:
            print(f"  (service RSS: max over {ledger.loaded_s:.0f} s of load in {ledger.runs} runs)")
    for name, extra in extras.items():
        print(f"\n{name}:")
        print("\n".join(extra.lines()))
    print()
    ok, correctness = _correctness(bench)
    ok = ok and all(extra.ok for extra in extras.values())
    meta = {**_meta(args, ledger), "code": bench.code}
    json_path, png_path = out / f"bench-{stamp}.json", out / f"bench-{stamp}.png"
    report.write_json(json_path, meta=meta, runs=bench.runs, summaries=summaries, goals=goals,
                      checks=correctness, extras={k: v.as_json() for k, v in extras.items()})
    print(f"code: commit {bench.code['commit']}, uncommitted in src/: {len(bench.code['uncommitted'])} file(s)")
    print(f"\nwrote {json_path}")
    if summaries:
        workers2 = f" (workers2: {WORKERS2} on both cores)" if "workers2" in args.scenarios else ""
        where = (f"against {args.url}" if bench.remote else
                 f"1 uvicorn worker on core {args.server_core}{workers2}, wrk on core {args.load_core}")
        title = (f"preorder bench {stamp} ({bench.code['commit']}): {where}, -c{args.connections}, "
                 f"median of {args.rounds} x {args.duration:g}s")
        report.write_chart(png_path, summaries, title=title)
        print(f"wrote {png_path}")
    return 0 if ok else 1


def _correctness(bench: Bench) -> tuple[bool, dict[str, Any]]:
    """The invariants after the load (locally), or with --url what can be told without the database."""
    ledger = bench.ledger
    if bench.backends is None:
        within = ledger.max_orders is None or ledger.sent <= ledger.max_orders
        print("correctness: SKIPPED (--url: no access to the deployment's database; run `preorder reconcile` "
              "there to compare Redis with PostgreSQL)")
        print(f"  POSTs sent {ledger.sent:,} (the most orders this run can have created), 201s received "
              f"{ledger.created_201:,}, --max-orders {ledger.max_orders:,}: {'ok' if within else 'EXCEEDED'}")
        print(f"  unexpected answers (not 201/409, socket errors, timeouts): {ledger.unexpected:,}")
        return within, {"ok": within, "skipped": "no database access with --url", "sent": ledger.sent,
                        "created_201": ledger.created_201, "max_orders": ledger.max_orders,
                        "unexpected_answers": ledger.unexpected}
    backends = bench.backends
    result = checks.check(
        database_url=backends.database_url, redis_url=backends.redis_url,
        products=[*bench.seed.all_products, *bench.extra_products],
        created_201=ledger.created_201, in_flight_bound=ledger.connections * ledger.runs,
        unexpected_answers=ledger.unexpected, seeded=bench.seeded,
    )
    print("\n".join(result.lines()))
    return result.ok, {"ok": result.ok, **vars(result), "unanswered_orders": result.unanswered_orders}


def _code_version(ref: str | None) -> dict[str, Any]:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True, cwd=stack.ROOT).stdout.strip()

    if ref:
        return {"commit": git("rev-parse", "--short", ref), "uncommitted": [], "ref": ref}
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "src").splitlines()}


def _meta(args: argparse.Namespace, ledger: Ledger) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
        "machine": platform.machine(), "cores": os.cpu_count(), "cpu": _cpu_model(),
        "args": {k: v for k, v in vars(args).items() if k not in ("token", "token_command")},
        "service_loaded_s": ledger.loaded_s, "posts_sent": ledger.sent,
        "service_rss_max_mb": ledger.rss_max_bytes / report.MB,
        "pinning": {"server": args.server_core, "workers2": [args.server_core, args.load_core],
                    "wrk_and_driver": args.load_core,
                    "postgres_redis": None if args.no_pin_backends else args.load_core},
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
