"""Processes the benchmark starts: each is stopped by its own pid, also on Ctrl-C or an error, and the
server's memory and CPU are sampled from /proc while the load runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Managed:
    """A child process with a name, its log file, and a stop that only ever signals its own pid."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout_s)
        if self.alive():
            self.process.kill()
            self.process.wait()


def spawn(name: str, argv: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path) -> Managed:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        # own session: a Ctrl-C at the terminal reaches only the driver, which then stops us in order
        process = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return Managed(name, process, log)


def pin(pid: int, cores: set[int]) -> None:
    """Pin a running process (its future children inherit the mask: PostgreSQL backends are forked later)."""
    os.sched_setaffinity(pid, cores)


def children(parent: int) -> list[int]:
    """Direct children of a process, from /proc (ppid is field 4 of /proc/pid/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def family(pid: int) -> list[int]:
    """A server and its direct children: uvicorn's supervisor and its workers with --workers N > 1."""
    return [pid, *children(pid)]


def wait_http(url: str, process: Managed, *, timeout_s: float = 60) -> None:
    """Poll until the URL answers 200; fail early (with the log's tail) if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.process.returncode}:\n{tail(process.log)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} did not answer {url} within {timeout_s}s:\n{tail(process.log)}")


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (field 14 and 15 of /proc/pid/stat; the name may hold spaces)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def core_busy_ticks() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies since boot, from /proc/stat."""
    cores: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values]
            idle = ticks[3] + ticks[4]  # idle + iowait
            cores[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return cores


def cpu_of(pids: Iterable[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            found[pid] = cpu_seconds(pid)
    return found


def own_cpu_seconds() -> float:
    """This driver and its reaped children (wrk): os.times counts both."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def busy_seconds(cores: dict[int, tuple[int, int]]) -> float:
    return sum(busy for busy, _ in cores.values()) / _CLOCK_TICKS


@dataclass
class Usage:
    """What one process, everything we started, and the machine's cores did during one run."""

    rss_max_bytes: int = 0
    cpu_s: float = 0.0
    core_busy_pct: dict[int, float] = field(default_factory=dict)
    # CPU that processes the benchmark did not start used meanwhile, in % of one core: other work on a
    # shared machine, which steals time from the server or the load and makes the run noisy.
    foreign_cpu_pct: float = 0.0


@contextlib.contextmanager
def sampled(pid: int, *, ours: Callable[[], list[int]], every_s: float = 0.2) -> Iterator[Usage]:
    """Sample the RSS of a server's processes (itself and its workers, see `family`) in a thread while the
    block runs: the largest one process reached. CPU (all of them together) and core use are read at both ends."""
    pids = family(pid)
    usage, stop = Usage(rss_max_bytes=_largest_rss(pids)), threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            usage.rss_max_bytes = max(usage.rss_max_bytes, _largest_rss(pids))

    t0, cpu0, cores0 = time.monotonic(), cpu_of(pids), core_busy_ticks()
    ours0, own0 = cpu_of(ours()), own_cpu_seconds()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield usage
    finally:
        stop.set()
        sampler.join()
        wall, cores1, ours1 = time.monotonic() - t0, core_busy_ticks(), cpu_of(ours())
        usage.cpu_s = sum(t - cpu0.get(p, 0.0) for p, t in cpu_of(pids).items())
        usage.core_busy_pct = {
            core: 100 * (cores1[core][0] - busy) / max(cores1[core][1] - total, 1)
            for core, (busy, total) in cores0.items()
        }
        mine = sum(t - ours0.get(p, 0.0) for p, t in ours1.items()) + own_cpu_seconds() - own0
        usage.foreign_cpu_pct = 100 * max(busy_seconds(cores1) - busy_seconds(cores0) - mine, 0) / wall


def _largest_rss(pids: list[int]) -> int:
    sizes = [0]
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            sizes.append(rss_bytes(pid))
    return max(sizes)


def wait_quiet(*, max_busy_pct: float, max_wait_s: float, window_s: float = 1.0) -> float:
    """Wait (up to max_wait_s) for a window in which the whole machine is nearly idle: between runs our
    own servers idle, so anything busier is someone else's work that would skew the next run."""
    t0 = time.monotonic()
    while True:
        before = core_busy_ticks()
        time.sleep(window_s)
        busy = 100 * (busy_seconds(core_busy_ticks()) - busy_seconds(before)) / window_s
        waited = time.monotonic() - t0
        if busy <= max_busy_pct or waited >= max_wait_s:
            return waited
