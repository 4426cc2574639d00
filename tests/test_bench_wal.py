"""The benchmark's PostgreSQL starts with the spare WAL segments a running database has (bench/stack.py).

A new cluster creates each WAL segment as it fills the last one: 16 MB of zeros and an fsync while every commit
waits. Measured under create: all 64 requests stalled 70-85 ms once a segment, every 2-4 s, which set the p99."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from bench import stack

from preorder.embedded import EmbeddedPostgres

pytestmark = pytest.mark.faults  # starts a PostgreSQL of its own: ALTER SYSTEM must not touch a shared one

_SPARES = "SELECT count(*) FROM pg_ls_waldir() WHERE name > pg_walfile_name(pg_current_wal_lsn())"


async def test_ready_wal_leaves_recycled_segments_ahead_of_the_writes(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "postgres")
    url = pg.start()
    try:
        conn = await asyncpg.connect(url)
        try:
            before = await conn.fetchval(_SPARES)
            spares = await stack.ready_wal(url)
            assert spares == await conn.fetchval(_SPARES)
            assert await conn.fetchval("SHOW min_wal_size") == "1GB"
        finally:
            await conn.close()
    finally:
        pg.stop()
    assert before <= 1, before  # what a new cluster has: the next segment is created when it is needed
    # A checkpoint recycles as many as its estimate of the WAL to the next one (34 with the default max_wal_size)
    assert spares >= 16, spares
