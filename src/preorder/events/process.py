"""The relay as a process of its own: `preorder relay`, and the one `preorder serve` keeps beside its web workers.

A webhook delivery costs the relay about a third of the CPU of the create that caused it (an HTTP request out,
a signature, its bookkeeping; with httpx it cost more than the create). Inside a web worker, deliveries and
orders shared one event loop at equal priority, and one endpoint halved the creates a core answered. Beside the
workers, at nice +19 (CFS weight 15 against a web worker's 1024), the relay runs mostly on the CPU the orders
leave and still gets a sliver of a saturated core. The idle scheduling class (SCHED_IDLE) starved it outright on
a saturated machine (CI saw no delivery attempt for 20 s): events would wait as long as the load lasted; and it
did not spare create more than nice +19 does (`make bench --webhook`, README: what create loses to the relay is
on PostgreSQL, not on the server's core). During a burst the relay falls behind (the lag is in /metrics and
/readyz) and it catches up after. Nothing is lost either way: every event waits in the outbox until every sink
has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import uvloop

from preorder import db, logs, metrics
from preorder.events.relay import Relay
from preorder.settings import Settings

log = logging.getLogger("preorder.events")
RELAY_NICE = 19
_RESTART_PAUSE_S = 1.0
_POOL_CLOSE_S = 5.0
_PR_SET_PDEATHSIG = 1


def run(settings: Settings) -> int:
    """`preorder relay`: relay until SIGTERM or SIGINT, then stop between rounds (a send cut short is retried
    after its lease, as after a crash)."""
    logs.configure(settings.log_format)
    metrics.record(settings.metrics)
    return uvloop.run(_relay(settings))


async def _relay(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = await db.create_pool(settings)
    relay = asyncio.create_task(Relay(pool=pool, settings=settings).run_forever())
    log.info("relay started (pid %d)", os.getpid())
    try:
        await asyncio.wait([relay, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    finally:
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        try:
            await asyncio.wait_for(pool.close(), timeout=_POOL_CLOSE_S)
        except TimeoutError:  # PostgreSQL is not answering: the connections go without their goodbye
            pool.terminate()
        metrics.mark_process_dead(os.getpid())  # with several workers: its gauges leave the scrape's sums
    log.info("relay stopped")
    return 0


class RelayBeside:
    """The relay process `preorder serve` runs next to uvicorn: started at a lower priority, dying with its parent
    (even one killed by SIGKILL: the kernel sends it SIGTERM), restarted if it dies while the server runs."""

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._watch = threading.Thread(target=self._keep_running, name="relay-beside", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watch.start()

    def _spawn(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                parent, prctl = os.getpid(), _prctl()
                self._process = subprocess.Popen([sys.executable, "-m", "preorder", "relay"],
                                                 preexec_fn=lambda: _lower_priority_and_die_with(parent, prctl))

    def _keep_running(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            assert process is not None
            code = process.wait()
            if self._stopping.wait(_RESTART_PAUSE_S):
                return
            log.error("the relay process exited (status %s): starting it again", code)
            self._spawn()

    def stop(self, *, timeout_s: float) -> None:
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("the relay process did not stop within %.0f s: killed", timeout_s)
            process.kill()
            process.wait()


def _prctl() -> Any:
    """libc's prctl, looked up in the parent: between fork and exec the child must not dlopen (another thread of
    the parent may have held the loader's lock at the fork)."""
    return ctypes.CDLL(None, use_errno=True).prctl


def _lower_priority_and_die_with(parent: int, prctl: Any) -> None:
    """Runs in the child between fork and exec. The relay stays in the server's session, so where the kernel groups
    processes by session (sched_autogroup_enabled) it shares the server's group: nice ranks it below the workers
    there, and the group as a whole keeps its fair share against other sessions. A session of its own at nice +19
    starved it on a machine whose other sessions were busy (tests/test_relay_process.py, both cores loaded: the
    relay did not even log its start in time, 2 runs of 3)."""
    os.nice(RELAY_NICE)
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl: it would never be signalled
        os._exit(1)
