"""`preorder events`: print the events of the NATS stream as they arrive (one CloudEvents JSON per line)."""

from __future__ import annotations

import nats
from nats.js.api import DeliverPolicy

from preorder.events.nats_sink import SUBJECTS, ensure_stream


async def watch(url: str, *, from_start: bool, count: int | None) -> int:
    """An ordered consumer: no state left on the server, every message in stream order. `count`: stop after it."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        sub = await js.subscribe(SUBJECTS[0], ordered_consumer=True, deliver_policy=policy)
        seen = 0
        async for msg in sub.messages:
            print(msg.data.decode(), flush=True)
            seen += 1
            if count is not None and seen >= count:
                break
    finally:
        await nc.close()
    return 0
