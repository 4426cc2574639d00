"""The background reconciler's two passes. The full pass reads every hold; the regular pass reads only what can
have changed since the last one: fresh holds old enough to judge, and orders settled since. Each leak the
reconciler exists for must be found by the regular pass alone, and the regular pass must not read every hold."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from preorder.ids import new_id
from preorder.orders import repository as order_repo
from preorder.status import Status
from preorder.stock import repository as stock_repo
from preorder.stock.keys import product_keys
from preorder.stock.service import Ask
from preorder.workers.reconciler import Reconciler, settle_fresh
from tests.conftest import bearer, command_calls, make_product, reset_command_stats
from tests.invariants import assert_invariants

ME = bearer("U-pass")
ORPHAN_HOLD_S = 0.3  # holds without an order row are judged orphans after this long (the test waits it out)

K = product_keys("P1001")


async def _orders(client, n: int) -> list[uuid.UUID]:
    made = []
    for _ in range(n):
        r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=ME)
        assert r.status_code == 201, r.text
        made.append(uuid.UUID(r.json()["order_id"]))
    return made


async def _change_without_settling(app, order_id: uuid.UUID, to: str, frm: str = "pending") -> None:
    """What a process killed right after a status change leaves: the row changed, the hold untouched."""
    if to == "paid":  # a payment is recorded with it (I6)
        row = await app.state.pool.fetchrow("SELECT amount_due, updated_at FROM orders WHERE id = $1", order_id)
        payment = order_repo.NewPayment(
            order_id=order_id, kind="full", reference=f"PAY-{order_id}", amount=row["amount_due"], currency="USD",
            actor="admin-1", frm=Status.PENDING, to=Status.PAID, now=datetime.now(UTC), seen=row["updated_at"],
            late_ok=False)
        assert (await order_repo.pay(app.state.pool, payment, reason="test"))["applied"]
        return
    change = order_repo.Change(order_id=order_id, frm=Status(frm), to=Status(to), actor="admin-1", reason="test")
    assert await order_repo.transition(app.state.pool, change) is not None


async def _regular_pass_ready(app) -> Reconciler:
    reconciler = Reconciler(app.state.stock, orphan_hold_s=ORPHAN_HOLD_S, full_interval_s=3600)
    await reconciler.run()  # the full pass at start; everything after is the regular pass
    return reconciler


async def test_regular_pass_releases_an_orphan_hold_once_old_enough_and_keeps_the_rest(app, client, db, redis):
    await make_product(client, total_stock=10)
    reconciler = await _regular_pass_ready(app)
    written = await _orders(client, 3)
    orphan = new_id()  # reserved, then the process died before writing the order
    await app.state.stock.reserve(Ask("P1001", orphan, 2, "U-ghost", "127.0.0.1"))

    young = await reconciler.run()
    assert young.orphans == 0 and await redis.hexists(K.holds, str(orphan)), "too young to judge"

    await asyncio.sleep(ORPHAN_HOLD_S + 0.2)
    done = await reconciler.run()
    assert done.orphans == 1 and done.released == 0
    assert not await redis.hexists(K.holds, str(orphan))
    assert all([await redis.hexists(K.holds, str(o)) for o in written]), "written orders keep their holds"
    assert await redis.zcard(K.fresh) == 0, "every judged hold is forgotten"
    await assert_invariants(db, redis)


async def test_regular_pass_settles_a_cancel_or_ship_whose_redis_step_never_ran(app, client, db, redis):
    await make_product(client, total_stock=10)
    reconciler = await _regular_pass_ready(app)
    cancelled, shipped, kept = await _orders(client, 3)
    await _change_without_settling(app, cancelled, "cancelled")
    await _change_without_settling(app, shipped, "paid")
    await _change_without_settling(app, shipped, "shipped", frm="paid")

    done = await reconciler.run()
    assert (done.released, done.dropped) == (1, 1)
    assert int(await redis.hget(K.stock, "reserved")) == 2, "the cancelled unit came back, the shipped not"
    assert await redis.hexists(K.holds, str(kept))
    again = await reconciler.run()
    assert (again.released, again.dropped) == (0, 0), "settling is exactly once"
    await assert_invariants(db, redis)


async def test_fresh_holds_judged_by_asking_postgresql_only_for_the_orders_that_are_not_live(app, client, db, redis):
    await make_product(client, total_stock=10)
    cancelled, shipped, kept = await _orders(client, 3)
    orphan = new_id()
    await app.state.stock.reserve(Ask("P1001", orphan, 2, "U-ghost", "127.0.0.1"))
    await _change_without_settling(app, cancelled, "cancelled")
    await _change_without_settling(app, shipped, "paid")
    await _change_without_settling(app, shipped, "shipped", frm="paid")
    page = await redis.zrange(K.fresh, 0, -1)
    assert len(page) == 4

    rows = await stock_repo.not_live(app.state.pool, b",".join(page).decode())
    assert {r["id"]: r["status"] for r in rows} == {cancelled: "cancelled", shipped: "shipped", orphan: None}

    await asyncio.sleep(ORPHAN_HOLD_S + 0.2)
    done = await settle_fresh(app.state.stock, "P1001", orphan_hold_s=ORPHAN_HOLD_S)
    assert (done.released, done.dropped, done.orphans) == (1, 1, 1)
    assert await redis.hexists(K.holds, str(kept)) and not await redis.hexists(K.holds, str(orphan))
    assert int(await redis.hget(K.stock, "reserved")) == 2, "the live and the shipped order's units"
    assert await redis.zcard(K.fresh) == 0, "every judged hold is forgotten"
    await assert_invariants(db, redis)


async def test_a_fresh_page_looks_each_order_up_by_its_key_even_in_a_small_table(app, client, db, redis):
    """Asked as a join, a page of 1,000 ids read and hashed the whole orders table whenever PostgreSQL thought
    it small, and a connection could keep that plan as the table grew (100-190 ms a page in the benchmark)."""
    await make_product(client, total_stock=10_000)
    written = await _orders(client, 3)
    await db.execute("""INSERT INTO orders SELECT (jsonb_populate_record(NULL::orders,
                            to_jsonb(o) || jsonb_build_object('id', gen_random_uuid()))).*
                        FROM orders o, generate_series(1, 1000)""")  # 3,003 rows: small, but not one page
    await db.execute("ANALYZE orders")
    page = ",".join(str(o) for o in [*written, *(new_id() for _ in range(997))])
    plan = "\n".join(row[0] for row in await db.fetch(f"EXPLAIN {stock_repo.NOT_LIVE}", page))
    assert "Index Scan using orders_pkey on orders" in plan, plan
    assert "Seq Scan on orders" not in plan, plan


async def test_regular_pass_does_not_read_every_hold(app, client, db, redis):
    await make_product(client, total_stock=1000)
    await _orders(client, 200)
    reconciler = await _regular_pass_ready(app)
    await asyncio.sleep(ORPHAN_HOLD_S + 0.2)
    await reconciler.run()  # judges the 200 fresh holds once (they all have their rows) and forgets them
    assert await redis.zcard(K.fresh) == 0
    await reset_command_stats(redis)

    done = await reconciler.run()
    assert await command_calls(redis, "hscan") == await command_calls(redis, "hgetall") == 0
    assert done.young_unwritten == done.orphans == done.released == 0
    full = await Reconciler(app.state.stock, orphan_hold_s=ORPHAN_HOLD_S, full_interval_s=3600).run()
    assert await command_calls(redis, "hscan") > 0, "while the full pass does"
    assert full.orphans == 0


async def test_a_rebuild_forgets_fresh_holds_since_each_loaded_hold_has_its_row(app, client, db, redis):
    await make_product(client, total_stock=10)
    await _orders(client, 2)
    assert await redis.zcard(K.fresh) == 2
    await app.state.stock.rebuild("P1001")
    assert await redis.zcard(K.fresh) == 0
    assert await redis.hlen(K.holds) == 2
    await assert_invariants(db, redis)


async def test_orders_settled_since_are_read_page_by_page_without_gaps_or_repeats(app, client, db, redis):
    await make_product(client, total_stock=10)
    since = await stock_repo.database_now(app.state.pool)
    cancelled = await _orders(client, 5)
    for order_id in cancelled:
        await _change_without_settling(app, order_id, "cancelled")
    seen, after = [], None
    while rows := await stock_repo.settled_since(app.state.pool, since, after=after, limit=2):
        seen += [r["id"] for r in rows]
        after = (rows[-1]["updated_at"], rows[-1]["id"])
    assert sorted(seen) == sorted(cancelled) and len(seen) == 5
