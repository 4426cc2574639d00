"""The Redis key layout of the stock protocol: the one place that names a key.

Every key of a product shares the hash tag `{product_id}`, so a product lives in one Redis Cluster slot and its
scripts (which touch several of its keys at once) run unchanged on a cluster. The stock module, the reconciler,
the tests and the benchmark all read keys through this type."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class ProductKeys:
    product_id: str
    tag: str
    stock: str  # hash: total, reserved, epoch, starts, ends, limit (load.lua writes them all at once)
    holds: str  # hash: order_id -> "qty:user:reserved_at_ms"
    users: str  # hash: user_id -> units held
    fresh: str  # sorted set: order_id by reserved_at_ms, the holds the reconciler has yet to match with a row

    @property
    def scripts(self) -> tuple[str, str, str, str]:
        """KEYS 1-4 of reserve.lua, release.lua and load.lua, in that order."""
        return self.stock, self.holds, self.users, self.fresh

    def rate_user(self, user_id: str) -> str:
        return f"{self.tag}:rl:u:{user_id}"

    def rate_client(self, client: str) -> str:
        return f"{self.tag}:rl:c:{client}"


@lru_cache(maxsize=65_536)  # the hot path asks for the same product's keys on every create: build them once
def product_keys(product_id: str) -> ProductKeys:
    tag = f"po:{{{product_id}}}"
    return ProductKeys(product_id, tag, f"{tag}:stock", f"{tag}:holds", f"{tag}:users", f"{tag}:fresh")


def idempotency_marker(user_id: str, key: str) -> str:
    """The in-progress marker of a customer's Idempotency-Key (under the customer's own tag)."""
    return f"po:idem:{{{user_id}}}:{key}"
