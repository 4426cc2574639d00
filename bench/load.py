"""The load generator: wrk (C, not Python, so the client never competes with the server for the GIL or
slows down before it does), pinned to its own core, driven by bench/wrk/preorder.lua."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk" / "preorder.lua"
_MARK = "BENCHJSON "
_STOPPED = "BENCHSTOP "  # a thread reached its cap (or its first 409) and every POST it sent is answered


def ensure_wrk() -> str:
    """Install wrk (Debian package) when missing; the package lists may be stale, so update once if needed."""
    found = shutil.which("wrk")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed and apt-get could not install it")
    return found


@dataclass(frozen=True)
class LoadSpec:
    url: str  # base, e.g. http://127.0.0.1:8123
    products_file: Path
    tokens_file: Path
    duration_s: float
    connections: int
    core: int
    threads: int = 1
    timeout_s: float = 5.0
    # At most this many POSTs in this run (counted when wrk builds them, so in-flight ones are included): the
    # run ends at the cap or at duration_s, whichever comes first. None: no cap.
    max_requests: int | None = None
    stop_on_409: bool = False  # end the run at the first 409 (a flash sale's sell-out)
    noop_path: str = "/healthz"  # what a finishing connection asks for instead of another POST (GET)


@dataclass(frozen=True)
class WrkResult:
    """One wrk run; latencies in milliseconds. `requests` are the POSTs answered (not the no-ops a finishing
    connection sends); `sent` the POSTs sent, answered or not. The t_* are CLOCK_MONOTONIC microseconds:
    first POST sent, first 409 answered (0: none), last POST answered."""

    requests: int
    duration_s: float
    s201: int
    s409: int
    sother: int
    other_codes: str
    socket_errors: int
    timeouts: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    sent: int = 0
    noops: int = 0
    t_first_us: float = 0.0
    t_409_us: float = 0.0
    t_last_us: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def active_s(self) -> float:
        """From the first POST sent to the last one answered."""
        return max(self.t_last_us - self.t_first_us, 0) / 1e6

    @property
    def until_409_s(self) -> float | None:
        """From the first POST sent to the first 409 answered."""
        return (self.t_409_us - self.t_first_us) / 1e6 if self.t_409_us else None


def run_wrk(spec: LoadSpec, *, log: Path) -> WrkResult:
    pin = ["taskset", "-c", str(spec.core)] if spec.core >= 0 else []
    argv = [*pin, ensure_wrk(), f"-t{spec.threads}", f"-c{spec.connections}",
            f"-d{spec.duration_s:g}s", f"--timeout={spec.timeout_s:g}s", "--latency", "-s", str(SCRIPT),
            f"{spec.url}/api/preorder"]
    env = {**os.environ, "BENCH_TOKENS": str(spec.tokens_file), "BENCH_PRODUCTS": str(spec.products_file),
           "BENCH_THREADS": str(spec.threads), "BENCH_NOOP_PATH": spec.noop_path,
           "BENCH_DRAIN_MS": str(int(spec.timeout_s * 1000 + 1000)),
           "BENCH_STOP_ON_409": "1" if spec.stop_on_409 else "0"}
    if spec.max_requests is not None:
        env["BENCH_MAX_REQUESTS"] = str(spec.max_requests)
    lines: list[str] = []
    stopped: set[str] = set()
    # Popen (not run): a Ctrl-C here still reaches the finally that kills this pid
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as wrk:
        guard = threading.Timer(spec.duration_s + 60, wrk.kill)  # wrk ends at -d; this is for a hung one
        guard.start()
        try:
            assert wrk.stdout is not None
            for line in wrk.stdout:
                lines.append(line)
                if line.startswith(_STOPPED):
                    stopped.add(line.split()[1])
                    if len(stopped) == spec.threads:
                        # every thread is done, but wrk's main thread sleeps until -d: SIGINT ends that sleep
                        # (then wrk prints its summary and done() as at -d)
                        threading.Thread(target=_interrupt, args=(wrk,), daemon=True).start()
            wrk.wait()
        finally:
            guard.cancel()
            if wrk.poll() is None:
                wrk.kill()
    out = "".join(lines)
    with log.open("a") as f:
        f.write(out + "\n")
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}):\n{out}")
    return parse(out)


def _interrupt(wrk: subprocess.Popen[str]) -> None:
    # wrk ignores SIGINT until its threads are created (a run that stops at once can get there first): repeat
    while wrk.poll() is None:
        wrk.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            wrk.wait(0.5)


def parse(output: str) -> WrkResult:
    line = next((x for x in output.splitlines() if x.startswith(_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no {_MARK.strip()} line:\n{output}")
    raw = json.loads(line[len(_MARK):])
    ms = 1 / 1000
    return WrkResult(
        requests=raw["requests"] - raw.get("noops", 0), duration_s=raw["duration_us"] / 1e6,
        s201=raw["s201"], s409=raw["s409"], sother=raw["sother"], other_codes=raw["other_codes"],
        socket_errors=raw["err_connect"] + raw["err_read"] + raw["err_write"], timeouts=raw["err_timeout"],
        p50_ms=raw["p50_us"] * ms, p90_ms=raw["p90_us"] * ms, p99_ms=raw["p99_us"] * ms,
        p999_ms=raw["p999_us"] * ms, max_ms=raw["lat_max_us"] * ms, mean_ms=raw["lat_mean_us"] * ms,
        sent=raw.get("sent", 0), noops=raw.get("noops", 0), t_first_us=raw.get("t_first_us", 0),
        t_409_us=raw.get("t_409_us", 0), t_last_us=raw.get("t_last_us", 0),
    )
