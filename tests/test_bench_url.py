"""`python -m bench --url`: the load test of a running deployment never creates more orders than --max-orders.

A real `preorder serve` (the fault tests' harness) stands in for the deployment; the benchmark gets only its URL,
customer tokens (from a --token-command) and a product id, and starts nothing of its own."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from preorder.auth import mint_token
from preorder.settings import Settings
from tests.conftest import ADMIN, SECRET

pytestmark = [
    pytest.mark.faults,  # starts processes
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"),
]
ROOT = Path(__file__).resolve().parent.parent
CAP = 40


async def test_url_mode_stops_at_max_orders(db, redis, settings, servers_for, tmp_path):
    server = servers_for(settings.redis_url)
    await server.start()
    async with server.client() as client:
        r = await client.post("/api/products", headers=ADMIN, json={
            "id": "LOADTEST", "name": "load test", "price_amount": 100, "currency": "USD", "total_stock": 100_000})
        assert r.status_code == 201, r.text
    minting = Settings(env="test", jwt_secret=SECRET, database_url="x", redis_url="x")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"{mint_token(minting, sub=f'lt{i}', role='customer')}\n" for i in range(20)))
    out = tmp_path / "results"

    bench = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", "--url", server.url, "--token-command", f"cat {tokens}",
        "--product", "LOADTEST", "--max-orders", str(CAP), "--scenarios", "create",
        "--duration", "2", "--rounds", "2", "--warmup", "1", "--connections", "8", "--out", str(out),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    printed, _ = await asyncio.wait_for(bench.communicate(), timeout=120)
    text = printed.decode()

    assert bench.returncode == 0, text
    orders = await db.fetchval("SELECT count(*) FROM orders WHERE product_id = 'LOADTEST'")
    assert 0 < orders <= CAP, text
    assert "correctness: SKIPPED" in text, text
    assert "--max-orders 40: ok" in text, text
    assert "skipped, --max-orders (40) is used up" in text, text  # the cap, not the clock, ended the load
    report = json.loads(next(out.glob("bench-*.json")).read_text())
    assert report["meta"]["posts_sent"] == CAP
    assert report["correctness"]["skipped"] and report["correctness"]["ok"]
    assert report["correctness"]["created_201"] <= orders  # a POST in flight at a deadline may be an order unseen
    assert "token_command" not in report["meta"]["args"]  # whatever prints tokens is not written down
