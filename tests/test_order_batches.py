"""Group-commit batches insert without locking their products first (migration 0008): the sold trigger, holding the
locks at the end of the statement, refuses a batch whose epoch moved or whose deadline passed meanwhile, and the
CHECK on `sold` one that Redis over-granted; the batch is then written again by the statement that locks first,
which answers each order exactly. Real PostgreSQL, a second connection playing the loader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from preorder.db import asyncpg_dsn
from preorder.ids import new_id
from preorder.orders import repository as repo
from tests.conftest import make_product
from tests.harness import eventually


@pytest.fixture
async def other(settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    yield conn
    await conn.close()


async def epoch_of(db: asyncpg.Connection, pid: str) -> int:
    return int(await db.fetchval("SELECT stock_epoch FROM products WHERE id = $1", pid))


def orders(pid: str, epoch: int, n: int, *, deadline_s: float = 20.0) -> list[repo.NewOrder]:
    now = datetime.now(UTC)
    return [repo.NewOrder(order_id=new_id(), product_id=pid, user_id=f"u{i}", quantity=1, epoch=epoch,
                          deadline=now + timedelta(seconds=deadline_s), now=now) for i in range(n)]


async def waiting_for_a_lock(db: asyncpg.Connection, writer: asyncpg.Connection) -> None:
    pid = writer.get_server_pid()
    event = await db.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
    assert event == "Lock", f"the batch is not waiting for the product lock yet ({event})"


async def test_a_loader_committing_while_a_batch_waits_for_the_lock_fences_the_batch(client, db, other, settings):
    await make_product(client, total_stock=10)
    epoch = await epoch_of(db, "P1001")
    writer = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        loader = other.transaction()
        await loader.start()
        await other.execute("SELECT 1 FROM products WHERE id = 'P1001' FOR UPDATE")  # a loader holds the row
        batch = orders("P1001", epoch, 3)
        writing = asyncio.create_task(repo.insert_many(writer, batch))
        await eventually(lambda: waiting_for_a_lock(db, writer), within=10)
        await other.execute("UPDATE products SET stock_epoch = stock_epoch + 1 WHERE id = 'P1001'")
        await loader.commit()
        written = await asyncio.wait_for(writing, 10)
    finally:
        await writer.close()
    assert set(written.values()) == {repo.Refused.FENCED}
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    assert await db.fetchval("SELECT sold FROM products WHERE id = 'P1001'") == 0


async def test_a_deadline_passing_while_a_batch_waits_for_the_lock_fences_the_batch(client, db, other, settings):
    await make_product(client, total_stock=10)
    epoch = await epoch_of(db, "P1001")
    writer = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        holder = other.transaction()
        await holder.start()
        await other.execute("SELECT 1 FROM products WHERE id = 'P1001' FOR NO KEY UPDATE")
        batch = orders("P1001", epoch, 2, deadline_s=1.0)
        writing = asyncio.create_task(repo.insert_many(writer, batch))
        await eventually(lambda: waiting_for_a_lock(db, writer), within=10)

        async def deadline_passed() -> None:
            assert await db.fetchval("SELECT clock_timestamp() > $1::timestamptz", batch[0].deadline)

        await eventually(deadline_passed, within=10)
        await holder.commit()  # the epoch did not move: only the deadline refuses
        written = await asyncio.wait_for(writing, 10)
    finally:
        await writer.close()
    assert set(written.values()) == {repo.Refused.FENCED}
    assert await db.fetchval("SELECT count(*) FROM orders") == 0


async def test_a_batch_redis_over_granted_is_written_as_far_as_it_fits(client, db):
    await make_product(client, total_stock=3)
    batch = orders("P1001", await epoch_of(db, "P1001"), 5)
    written = await repo.insert_many(db, batch)
    assert [written[n.order_id] for n in batch][3:] == [repo.Refused.OVER_STOCK] * 2
    assert all(not isinstance(written[n.order_id], repo.Refused) for n in batch[:3]), "first come, first written"
    assert await db.fetchval("SELECT sold FROM products WHERE id = 'P1001'") == 3


async def test_concurrent_batches_over_the_same_products_in_any_order_do_not_deadlock(client, db, settings):
    for pid in ("PA", "PB", "PC"):
        await make_product(client, pid, total_stock=10_000)
    epochs = {pid: await epoch_of(db, pid) for pid in ("PA", "PB", "PC")}
    conns = [await asyncpg.connect(asyncpg_dsn(settings.database_url)) for _ in range(4)]
    try:
        async def writes(conn: asyncpg.Connection, order: tuple[str, ...]) -> None:
            for _ in range(25):
                batch = [o for pid in order for o in orders(pid, epochs[pid], 2)]
                written = await repo.insert_many(conn, batch)
                assert not any(isinstance(w, repo.Refused) for w in written.values())

        await asyncio.wait_for(asyncio.gather(
            writes(conns[0], ("PA", "PB", "PC")), writes(conns[1], ("PC", "PB", "PA")),
            writes(conns[2], ("PB", "PA", "PC")), writes(conns[3], ("PC", "PA", "PB"))), 120)
    finally:
        for conn in conns:
            await conn.close()
    sold = await db.fetch("SELECT id, sold FROM products WHERE id IN ('PA', 'PB', 'PC') ORDER BY id")
    assert [r["sold"] for r in sold] == [200, 200, 200]
    assert await db.fetchval("SELECT count(*) FROM orders") == 600
