"""The load generator: wrk (C, not Python, so the client never competes with the server for the GIL or
slows down before it does), pinned to its own core, driven by bench/wrk/preorder.lua."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk" / "preorder.lua"
_MARK = "BENCHJSON "


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


@dataclass(frozen=True)
class WrkResult:
    """One wrk run; latencies in milliseconds."""

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

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def run_wrk(spec: LoadSpec, *, log: Path) -> WrkResult:
    argv = ["taskset", "-c", str(spec.core), ensure_wrk(), f"-t{spec.threads}", f"-c{spec.connections}",
            f"-d{spec.duration_s:g}s", f"--timeout={spec.timeout_s:g}s", "--latency", "-s", str(SCRIPT),
            f"{spec.url}/api/preorder"]
    env = {**os.environ, "BENCH_TOKENS": str(spec.tokens_file), "BENCH_PRODUCTS": str(spec.products_file)}
    # Popen + wait (not run): a Ctrl-C here still reaches the finally that kills this pid
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as wrk:
        try:
            out, _ = wrk.communicate(timeout=spec.duration_s + 60)
        finally:
            if wrk.poll() is None:
                wrk.kill()
    with log.open("a") as f:
        f.write(out + "\n")
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}):\n{out}")
    return parse(out)


def parse(output: str) -> WrkResult:
    line = next((x for x in output.splitlines() if x.startswith(_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no {_MARK.strip()} line:\n{output}")
    raw = json.loads(line[len(_MARK):])
    ms = 1 / 1000
    return WrkResult(
        requests=raw["requests"], duration_s=raw["duration_us"] / 1e6,
        s201=raw["s201"], s409=raw["s409"], sother=raw["sother"], other_codes=raw["other_codes"],
        socket_errors=raw["err_connect"] + raw["err_read"] + raw["err_write"], timeouts=raw["err_timeout"],
        p50_ms=raw["p50_us"] * ms, p90_ms=raw["p90_us"] * ms, p99_ms=raw["p99_us"] * ms,
        p999_ms=raw["p999_us"] * ms, max_ms=raw["lat_max_us"] * ms, mean_ms=raw["lat_mean_us"] * ms,
    )
