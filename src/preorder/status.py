"""Order statuses: one enum for every layer (machine, service, schemas, SQL parameters, stock settling).

A leaf module (no imports from the package), so stock/, workers/ and orders/ can all use it without a cycle."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    PENDING = "pending"  # awaiting payment (full plan) or the deposit (deposit plan)
    DEPOSIT_PAID = "deposit_paid"  # deposit plan: awaiting the balance in the product's balance window
    PAID = "paid"
    SHIPPED = "shipped"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FORFEITED = "forfeited"  # balance not paid by balance_ends_at: stock back, the deposit kept


# Holds whose stock can still come back (kept in Redis once everything is settled).
LIVE: tuple[Status, ...] = (Status.PENDING, Status.DEPOSIT_PAID, Status.PAID)
# Statuses that gave their stock back; SQL's order_holds_stock(status) is the complement of these.
RELEASED: tuple[Status, ...] = (Status.CANCELLED, Status.FORFEITED)
# Statuses whose hold is dropped with its stock kept sold.
DROPPED: tuple[Status, ...] = (Status.SHIPPED, Status.COMPLETED)
# Terminal statuses a payment can no longer be applied to: it is recorded and refunded.
CLOSED: tuple[Status, ...] = RELEASED


def sql_list(statuses: tuple[Status, ...]) -> str:
    """A SQL literal list, for index predicates and constant filters that must match the enum."""
    return "(" + ", ".join(f"'{s.value}'" for s in statuses) + ")"
