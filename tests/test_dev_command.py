"""`preorder dev` needs no configuration: embedded servers, migrated, a demo product, tokens, docs, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from preorder.embedded import free_port

PREORDER = str(Path(sys.executable).with_name("preorder"))


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _start_dev(tmp_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREORDER_")}
    env["PREORDER_DATA_DIR"] = str(tmp_path)
    with log.open("w") as out:
        return subprocess.Popen([PREORDER, "dev", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(30)


@pytest.mark.faults
def test_dev_serves_the_seed_example_and_stops_its_servers_on_ctrl_c(tmp_path):
    port, log = free_port(), tmp_path / "dev.log"
    proc = _start_dev(tmp_path, port, log)
    try:
        _wait_for(lambda: _healthy(port), 90, "preorder dev to answer /healthz")
        text = log.read_text()
        token = re.search(r"customer U123 token:\s+(\S+)", text).group(1)
        assert "/docs" in text
        seed = {"product_id": "P1001", "quantity": 2, "user_id": "U123"}
        r = httpx.post(f"http://127.0.0.1:{port}/api/preorder", json=seed,
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 201 and r.json()["status"] == "pending"
        docs = httpx.get(f"http://127.0.0.1:{port}/docs", timeout=5).text
        assert "/static-offline-docs/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()["status"] == "ready"
        _assert_created_event_on_the_stream(text, r.json()["order_id"])
    finally:
        _stop(proc)
    assert "embedded servers stopped" in log.read_text()
    assert not (tmp_path / "dev" / "postgres" / "postmaster.pid").exists(), "PostgreSQL left running"

    proc = _start_dev(tmp_path, port, tmp_path / "dev2.log")
    try:
        _wait_for(lambda: _healthy(port), 90, "preorder dev to come back")
        again = httpx.get(f"http://127.0.0.1:{port}/api/preorder/{r.json()['order_id']}",
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert again.status_code == 200, "orders survive a restart of preorder dev"
        product = httpx.get(f"http://127.0.0.1:{port}/api/products/P1001", timeout=10).json()
        assert product["reserved"] == 2
    finally:
        _stop(proc)


def _assert_created_event_on_the_stream(welcome: str, order_id: str) -> None:
    """The embedded NATS is up and the relay published the order's first event; `preorder events` shows it."""
    nats_url = re.search(r"NATS\s+(nats://\S+)", welcome).group(1)
    assert f"preorder events --nats-url {nats_url}" in welcome
    watched = subprocess.run([PREORDER, "events", "--nats-url", nats_url, "--from-start", "--count", "1"],
                             capture_output=True, timeout=60, check=True)
    event = json.loads(watched.stdout)
    assert event["type"] == "preorder.order.created" and event["subject"] == order_id and event["sequence"] == 1
