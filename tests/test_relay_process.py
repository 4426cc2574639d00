"""`preorder serve` relays events from a process of its own, beside its workers: at a lower CPU priority, started
again if it dies, and gone with the server however the server ends (SIGTERM, or kill -9 of the server alone)."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from preorder.events.process import RELAY_NICE
from tests.conftest import bearer
from tests.events_peers import Receiver, endpoint, receiving
from tests.harness import Server, eventually, new_product, server_env
from tests.test_events_faults import RELAY_TIMINGS


def _relay_pids(server: Server) -> list[int]:
    """The server's children running `python -m preorder relay`."""
    assert server.process is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == server.process.pid and state != "Z" and argv[1:4] == [b"-m", b"preorder", b"relay"]:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _one_relay(server: Server, *, not_: int | None = None) -> int:
    """The one relay process beside the server (other than `not_`, one just killed), once it has started."""
    pids: list[int] = []

    async def started() -> None:
        pids[:] = [pid for pid in _relay_pids(server) if pid != not_]
        assert len(pids) == 1, f"relay processes beside the server: {pids}"
        assert f"relay started (pid {pids[0]})" in server.log.read_text(errors="replace")

    await eventually(started, within=30)
    return pids[0]


async def _ordered_and_delivered(client: httpx.AsyncClient, receiver: Receiver) -> None:
    r = await client.post("/api/preorder", json={"product_id": "HOT", "quantity": 1}, headers=bearer("U1"))
    assert r.status_code == 201, r.text
    order_id = r.json()["order_id"]

    async def delivered() -> None:
        assert order_id in {e["subject"] for e in receiver.events("shop")}

    await eventually(delivered, within=30)


@pytest.fixture
async def relaying(tmp_path: Path, settings, db, redis) -> AsyncIterator[tuple[Server, httpx.AsyncClient, Receiver]]:
    server = Server(server_env(settings.database_url, settings.redis_url, **RELAY_TIMINGS), tmp_path)
    try:
        async with receiving() as receiver:
            await server.start()
            async with server.client(timeout=10) as client:
                await endpoint(client, receiver, "shop")
                await new_product(client, "HOT", total_stock=1_000)
                yield server, client, receiver
    finally:
        server.kill()


async def test_serve_relays_from_a_low_priority_process_started_again_if_it_dies(relaying):
    server, client, receiver = relaying
    assert server.process is not None
    relay = await _one_relay(server)
    assert os.sched_getscheduler(relay) == os.SCHED_OTHER, "never starved outright (SCHED_IDLE would be)"
    assert os.getpriority(os.PRIO_PROCESS, relay) - os.getpriority(os.PRIO_PROCESS, server.process.pid) == RELAY_NICE
    await _ordered_and_delivered(client, receiver)

    os.kill(relay, signal.SIGKILL)
    await _one_relay(server, not_=relay)  # the server started a new relay process
    await _ordered_and_delivered(client, receiver)
    assert not receiver.forged


async def test_the_relay_process_ends_with_the_server(relaying):
    server, _, _ = relaying
    assert server.process is not None
    relay = await _one_relay(server)
    server.stop()  # SIGTERM: uvicorn stops, then the relay
    assert server.process.returncode == 0, server.log_tail()
    assert not _alive(relay), "the relay stopped with a graceful stop"
    assert "relay stopped" in server.log.read_text()

    await server.start()
    relay = await _one_relay(server)
    os.kill(server.process.pid, signal.SIGKILL)  # the server alone, not its process group
    server.process.wait(10)

    async def gone() -> None:
        assert not _alive(relay), "the kernel told the orphaned relay its parent died"

    await eventually(gone, within=15)
