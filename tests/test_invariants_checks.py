"""The invariant checker finds what it claims to find: a broken history and a payment without its event row."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import bearer, make_product
from tests.invariants import assert_invariants


async def _order(client) -> uuid.UUID:
    await make_product(client)
    r = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=bearer("U1"))
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["order_id"])


async def test_a_second_release_event_breaks_the_history(client, db, redis):
    order = await _order(client)
    await assert_invariants(db, redis)
    for seq in (2, 3):  # cancelled, then cancelled again from pending: released twice and a gap
        await db.execute("INSERT INTO order_events (order_id, from_status, to_status, actor, reason, sequence, type) "
                         "VALUES ($1, 'pending', 'cancelled', 'ops', 'by hand', $2, 'cancelled')", order, seq)
    with pytest.raises(AssertionError, match="I4/I5 event history broken"):
        await assert_invariants(db, redis, settled=False)


async def test_a_payment_without_its_event_row_is_found(client, db, redis):
    order = await _order(client)
    await db.execute("INSERT INTO payments (order_id, kind, reference, amount, currency, outcome, actor) "
                     "VALUES ($1, 'full', 'PAY-NO-EVENT', 1, 'USD', 'refunded', 'U1')", order)
    with pytest.raises(AssertionError, match="I5 a payment or refund without exactly one event row"):
        await assert_invariants(db, redis, settled=False)
