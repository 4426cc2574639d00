"""The status machine as data: which transitions exist, who may make them, what they do to stock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from preorder.auth import Principal


@dataclass(frozen=True, slots=True)
class Rule:
    owner_may: bool  # may the order's customer make it (admins always may)
    stock: Literal["release", "drop"] | None  # what happens to the order's hold afterwards


TRANSITIONS: dict[tuple[str, str], Rule] = {
    ("pending", "paid"): Rule(owner_may=True, stock=None),
    ("paid", "shipped"): Rule(owner_may=False, stock="drop"),
    ("shipped", "completed"): Rule(owner_may=True, stock=None),
    ("pending", "cancelled"): Rule(owner_may=True, stock="release"),
    ("paid", "cancelled"): Rule(owner_may=True, stock="release"),
}


def rule_for(frm: str, to: str) -> Rule | None:
    return TRANSITIONS.get((frm, to))


def may(principal: Principal, rule: Rule) -> bool:
    return principal.is_admin or rule.owner_may


def may_ever(principal: Principal, to: str) -> bool:
    """Whether this principal may move any order to `to` (a customer never ships): 403 before 409."""
    return principal.is_admin or any(r.owner_may for (_, target), r in TRANSITIONS.items() if target == to)
