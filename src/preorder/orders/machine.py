"""The status machine as data: which transitions exist, who may make them, what they do to stock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from preorder.auth import Principal
from preorder.status import Status

# Who makes a transition: a request (the order's customer, or any admin), a recorded payment, or the sweeper.
By = Literal["request", "payment", "sweeper"]


@dataclass(frozen=True, slots=True)
class Rule:
    owner_may: bool  # by request: may the order's customer make it (admins always may)
    stock: Literal["release", "drop"] | None  # what happens to the order's hold afterwards
    by: By = "request"


P, D, PAID = Status.PENDING, Status.DEPOSIT_PAID, Status.PAID
TRANSITIONS: dict[tuple[Status, Status], Rule] = {
    (P, PAID): Rule(owner_may=True, stock=None),  # full plan: PUT {status: paid, payment} or a full payment
    (P, D): Rule(owner_may=False, stock=None, by="payment"),  # deposit plan: the deposit payment
    (D, PAID): Rule(owner_may=False, stock=None, by="payment"),  # the balance, inside the balance window
    (PAID, Status.SHIPPED): Rule(owner_may=False, stock="drop"),
    (Status.SHIPPED, Status.COMPLETED): Rule(owner_may=True, stock=None),
    (P, Status.CANCELLED): Rule(owner_may=True, stock="release"),  # also the sweeper, past pay_by
    (D, Status.CANCELLED): Rule(owner_may=True, stock="release"),  # a customer's cancel keeps the deposit
    (PAID, Status.CANCELLED): Rule(owner_may=True, stock="release"),
    (D, Status.FORFEITED): Rule(owner_may=False, stock="release", by="sweeper"),  # balance window closed
}


def rule_for(frm: str, to: str) -> Rule | None:
    return TRANSITIONS.get((Status(frm), Status(to)))


def may(principal: Principal, rule: Rule) -> bool:
    return rule.by == "request" and (principal.is_admin or rule.owner_may)


def may_ever(principal: Principal, to: str) -> bool:
    """Whether this principal may move any order to `to` (a customer never ships): 403 before 409."""
    return any(r.by == "request" and (principal.is_admin or r.owner_may)
               for (_, target), r in TRANSITIONS.items() if target == to)
