"""A customer's limits across all products: creates per window per customer and per client address, and the
units one customer holds unpaid at once (PREORDER_MAX_UNPAID_PER_CUSTOMER).

The product's keys live in the product's Redis Cluster slot ({P1001}) and the customer's in the customer's
({u:U123}), so no one script can touch both. A create therefore queues two asks in the same loop turn: its
admission (limits.lua, in the customer's and the address's slots) and its reservation (reserve.lua, in the
product's). The batcher sends both in one pipeline: one round trip. If one side refuses, the other is undone
(the reservation released, or the units given back); only such mixed outcomes cost a second call."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from preorder.cache import RedisClient
from preorder.errors import DomainError, RateLimited, Unavailable, UnpaidLimitReached
from preorder.stock.batching import Head, ScriptBatcher
from preorder.stock.keys import UNPAID_PATTERN, address_rate_key, customer_keys
from preorder.stock.scripts import script_text

log = logging.getLogger("preorder.stock")


@dataclass(frozen=True, slots=True)
class CustomerRules:
    per_user: int = 1_000_000  # creates per window per customer, across products
    per_address: int = 1_000_000  # creates per window per client address, across customers and products
    window_ms: int = 1000
    max_unpaid: int = 1_000_000  # units held by one customer's pending orders at once


class Admission:
    """One create's claim on its customer's limits. The answers arrive with the reservation's (same pipeline);
    `check` raises the refusal, `cancel` gives back the units of a create that did not go ahead."""

    __slots__ = ("_decided", "_futures", "_holds_units", "_limits", "_quantity", "_refusal", "_user_id")

    def __init__(self, limits: CustomerLimits, futures: tuple[asyncio.Future[Any], ...], *, user_id: str,
                 quantity: int) -> None:
        self._limits, self._futures = limits, futures  # the customer's ask first (it holds the units)
        self._user_id, self._quantity = user_id, quantity
        self._refusal: DomainError | None = None
        self._holds_units = self._decided = False

    async def check(self) -> None:
        """Raise the customer's or address's refusal, if there is one."""
        if not self._decided and len(self._futures) == 1:  # the hot path: one ask, admitted
            answer = await self._futures[0]
            if answer[0] == b"OK":
                self._decided = self._holds_units = True
                return
        refusal = await self._verdict()
        if refusal is not None:
            raise refusal

    async def cancel(self) -> None:
        """The create did not go ahead (refused by the product, or its write failed): give back its units."""
        await self._verdict()
        if self._holds_units:
            self._holds_units = False
            await self._limits.give_back(self._user_id, self._quantity)

    async def _verdict(self) -> DomainError | None:
        if self._decided:
            return self._refusal
        try:
            answers = [await future for future in self._futures]
        finally:
            for future in self._futures:  # all came in one pipeline: retrieve every outcome
                if future.done() and not future.cancelled():
                    future.exception()
        self._decided = True
        self._holds_units = answers[0][0] == b"OK"
        refusals = [r for r in map(_refusal, answers) if r is not None]
        self._refusal = refusals[0] if refusals else None
        if self._refusal is not None:
            await self.cancel()
        return self._refusal


def _refusal(answer: list[Any]) -> DomainError | None:
    code = answer[0]
    if code == b"OK":
        return None
    if code == b"RATE_LIMITED":
        who = "this customer" if int(answer[2]) == 1 else "this address"
        return RateLimited(max(1, math.ceil(int(answer[1]) / 1000)), f"Too many order requests from {who}")
    if code == b"UNPAID_LIMIT":
        return UnpaidLimitReached("Pay or cancel your pending orders before ordering more", held=int(answer[1]))
    log.error("limits script failed: %s", answer)
    return Unavailable("Limits could not be checked; retry")


_GIVE: Head = ((), ("give",))
_COUNTED_PAGE = 1000  # unpaid counters read per round trip by the recount
# The hot path's per-ask arguments, encoded once (redis-py would encode them on every call).
_QUANTITIES = [str(q).encode() for q in range(64)]


@lru_cache(maxsize=4_096)
def _single_ask_keys(user_id: str, address: str) -> list[bytes]:
    """KEYS of the one ask a single Redis gets: the customer's rate and units, the address's rate. The batcher
    copies them into its call, so the cached list is never changed."""
    keys = customer_keys(user_id)
    return [keys.rate.encode(), keys.unpaid.encode(), address_rate_key(address).encode()]


class CustomerLimits:
    def __init__(self, redis: RedisClient, batcher: ScriptBatcher, rules: CustomerRules) -> None:
        self.redis, self.rules, self._batcher = redis, rules, batcher
        self._admit = redis.register_script(script_text("limits.lua"))
        self._unpaid = redis.register_script(script_text("unpaid.lua"))
        limits = (rules.window_ms, rules.per_user, rules.max_unpaid, rules.per_address)
        self._heads: dict[str, Head] = {mode: ((), (*limits, mode)) for mode in ("both", "customer", "address")}
        # On Redis Cluster a script may touch one slot only, so asks are grouped by slot; a single Redis takes
        # all of a turn's asks in one call.
        self._cluster = isinstance(redis, RedisCluster)

    def admit(self, *, user_id: str, address: str, quantity: int) -> Admission:
        """Queue the create's admission: answered in the pipeline of this loop turn (no round trip of its own).
        On a single Redis one ask counts the customer and the address; a cluster needs one ask per slot."""
        qty = _QUANTITIES[quantity] if quantity < len(_QUANTITIES) else str(quantity).encode()
        if not self._cluster:
            both = self._batcher(self._heads["both"], keys=_single_ask_keys(user_id, address), args=[qty],
                                 script=self._admit)
            return Admission(self, (both,), user_id=user_id, quantity=quantity)
        keys, rate = customer_keys(user_id), address_rate_key(address)
        user = self._batcher(self._heads["customer"], keys=[keys.rate, keys.unpaid, keys.rate], args=[qty],
                             script=self._admit, group=key_slot(keys.rate.encode()))
        by_address = self._batcher(self._heads["address"], keys=[rate, rate, rate], args=[qty],
                                   script=self._admit, group=key_slot(rate.encode()))
        return Admission(self, (user, by_address), user_id=user_id, quantity=quantity)

    async def give_back(self, user_id: str, quantity: int) -> None:
        """An order stopped being unpaid (paid, cancelled, expired) or its create failed."""
        # Through the batcher: at a sell-out moment every create in flight is refused at once and gives its units
        # back; one call each took a pooled connection each (63 for 290 refusals), and some waited past the
        # pool's bound (503s for 409s). Batched, a loop turn's give-backs are one call (per cluster slot).
        key = customer_keys(user_id).unpaid
        await self._batcher(_GIVE, keys=[key], args=[quantity], script=self._unpaid,
                            group=key_slot(key.encode()) if self._cluster else 0)

    async def unpaid(self, user_id: str) -> int:
        return int(await self.redis.get(customer_keys(user_id).unpaid) or 0)

    async def counted(self) -> AsyncIterator[tuple[str, str]]:
        """Every customer's unpaid counter as Redis holds it now: (user id, value). The values of each page of
        keys SCAN finds are read with one MGET (on a cluster, one per slot), not one GET per customer."""
        page: list[bytes | str] = []
        async for key in self.redis.scan_iter(match=UNPAID_PATTERN, count=_COUNTED_PAGE):
            page.append(key)
            if len(page) == _COUNTED_PAGE:
                for counter in await self._values(page):
                    yield counter
                page = []
        for counter in await self._values(page):
            yield counter

    async def _values(self, keys: list[bytes | str]) -> list[tuple[str, str]]:
        if not keys:
            return []
        redis = self.redis
        values = await (redis.mget_nonatomic(keys) if isinstance(redis, RedisCluster) else redis.mget(keys))
        # A counter deleted since SCAN saw it reads as empty, as a missing one.
        return [(_text(key)[len("po:{u:"):-len("}:unpaid")], _text(value or b"")) for key, value in zip(
            keys, values, strict=True)]

    async def recount(self, user_id: str, *, seen: str, counted: int) -> bool:
        """Set the counter to PostgreSQL's count if no create or payment moved it since it read `seen`."""
        return bool(await self._unpaid(keys=[customer_keys(user_id).unpaid], args=["recount", seen, counted]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

