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
    absent: str  # string with a TTL: PostgreSQL has no such product (a negative cache, deleted when it is created)

    @property
    def scripts(self) -> tuple[str, str, str, str]:
        """KEYS 1-4 of reserve.lua, release.lua and load.lua, in that order."""
        return self.stock, self.holds, self.users, self.fresh

    @property
    def reserve_head(self) -> tuple[str, str, str, str, str]:
        """KEYS 1-5 of reserve.lua: the four above and the unknown-product marker."""
        return self.stock, self.holds, self.users, self.fresh, self.absent

    def rate_user(self, user_id: str) -> str:
        return f"{self.tag}:rl:u:{user_id}"

    def rate_client(self, client: str) -> str:
        return f"{self.tag}:rl:c:{client}"


# The hot path asks for the same product's keys on every create: build them once. Bounded well below what a
# flood of made-up product ids could fill it with (each entry is ~1 kB).
@lru_cache(maxsize=4_096)
def product_keys(product_id: str) -> ProductKeys:
    tag = f"po:{{{product_id}}}"
    return ProductKeys(product_id, tag, f"{tag}:stock", f"{tag}:holds", f"{tag}:users", f"{tag}:fresh",
                       f"{tag}:absent")


@dataclass(frozen=True, slots=True)
class CustomerKeys:
    """A customer's counters across all products, under the customer's own hash tag `{u:<user_id>}`: one Redis
    Cluster slot per customer, apart from every product's slot (see limits.lua and README "Security")."""

    rate: str  # string with a TTL: creates in the current window
    unpaid: str  # string: units held by the customer's pending orders


@lru_cache(maxsize=4_096)
def customer_keys(user_id: str) -> CustomerKeys:
    tag = f"po:{{u:{user_id}}}"
    return CustomerKeys(f"{tag}:rate", f"{tag}:unpaid")


UNPAID_PATTERN = "po:{u:*}:unpaid"  # SCAN pattern of every customer's unpaid counter (the recount)
UNPAID_RECOUNT_LEASE = "po:unpaid:recount-lease"  # held by the one process that recounts in this interval


def address_rate_key(address: str) -> str:
    """Creates in the current window from one client address, across customers and products."""
    return f"po:{{a:{address}}}:rate"


def idempotency_marker(user_id: str, key: str) -> str:
    """The in-progress marker of a customer's Idempotency-Key (under the customer's own tag)."""
    return f"po:idem:{{{user_id}}}:{key}"
