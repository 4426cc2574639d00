"""Group-commit batches insert without locking their products first (migration 0008): the sold trigger, holding the
locks at the end of the statement, refuses a batch whose epoch moved or whose deadline passed meanwhile, and the
CHECK on `sold` one that Redis over-granted; the batch is then written again by the statement that locks first,
which answers each order exactly. Real PostgreSQL, a second connection playing the loader."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from preorder.db import asyncpg_dsn
from preorder.ids import new_id
from preorder.orders import repository as repo
from preorder.orders.group_commit import GroupCommit
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


@pytest.fixture
async def writer(settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    yield conn
    await conn.close()


async def written_behind_a_lock(db: asyncpg.Connection, holder: asyncpg.Connection, writer: asyncpg.Connection,
                                batch: list[repo.NewOrder], lock: str,
                                meanwhile: Callable[[], Awaitable[None]]) -> dict[uuid.UUID, repo.Written]:
    """`holder` locks P1001 (`lock`), the batch starts and waits for that lock at its statement's end, `meanwhile`
    runs inside the holder's transaction, the holder commits: what the batch wrote."""
    async with holder.transaction():
        await holder.execute(f"SELECT 1 FROM products WHERE id = 'P1001' {lock}")
        writing = asyncio.create_task(repo.insert_many(writer, batch))
        await eventually(lambda: waiting_for_a_lock(db, writer), within=10)
        await meanwhile()
    return await asyncio.wait_for(writing, 10)


async def test_a_loader_committing_while_a_batch_waits_for_the_lock_fences_the_batch(client, db, other, writer):
    await make_product(client, total_stock=10)
    batch = orders("P1001", await epoch_of(db, "P1001"), 3)

    async def rebuild() -> None:  # the loader bumps the epoch
        await other.execute("UPDATE products SET stock_epoch = stock_epoch + 1 WHERE id = 'P1001'")

    written = await written_behind_a_lock(db, other, writer, batch, "FOR UPDATE", rebuild)
    assert set(written.values()) == {repo.Refused.FENCED}
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    assert await db.fetchval("SELECT sold FROM products WHERE id = 'P1001'") == 0


async def test_a_deadline_passing_while_a_batch_waits_for_the_lock_fences_the_batch(client, db, other, writer):
    await make_product(client, total_stock=10)
    batch = orders("P1001", await epoch_of(db, "P1001"), 2, deadline_s=1.0)

    async def deadline_passed() -> None:  # the epoch does not move: only the deadline refuses
        assert await db.fetchval("SELECT clock_timestamp() > $1::timestamptz", batch[0].deadline)

    written = await written_behind_a_lock(db, other, writer, batch, "FOR NO KEY UPDATE",
                                          lambda: eventually(deadline_passed, within=10))
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


async def test_orders_granted_in_one_loop_turn_are_written_as_one_batch(client, db, other, settings):
    """One Redis answer grants many reservations, and their requests resume in one loop turn: with a batch in
    flight and a slot free, they go as one batch, not as a batch of one and another of the rest."""
    await make_product(client, total_stock=100)
    epoch = await epoch_of(db, "P1001")
    pool = await asyncpg.create_pool(asyncpg_dsn(settings.database_url), min_size=2, max_size=2)
    sizes: list[int] = []

    async def write(news: list[repo.NewOrder]) -> dict[uuid.UUID, repo.Written]:
        sizes.append(len(news))
        async with pool.acquire() as conn:
            return await repo.insert_many(conn, news)

    group = GroupCommit(write, max_inflight=2)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM products WHERE id = 'P1001' FOR NO KEY UPDATE")
            first = asyncio.ensure_future(group.submit(orders("P1001", epoch, 1)[0]))
            await eventually(lambda: _batches_wait(db, 1), within=10)
            rest = [asyncio.ensure_future(group.submit(o)) for o in orders("P1001", epoch, 10)]  # one loop turn
            await eventually(lambda: _batches_wait(db, 2), within=10)
        written = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    finally:
        await pool.close()
    assert sizes == [1, 10]
    assert not any(isinstance(w, repo.Refused) for w in written)
    assert await db.fetchval("SELECT sold FROM products WHERE id = 'P1001'") == 11


async def _batches_wait(db: asyncpg.Connection, n: int) -> None:
    waiting = await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    assert waiting == n, f"{waiting} batches wait for the product lock, not {n}"
