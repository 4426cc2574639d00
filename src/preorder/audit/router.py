"""GET /api/audit: the admin actions, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from preorder.audit import repository as repo
from preorder.audit.schemas import AuditEntry, AuditPage, AuditQuery
from preorder.auth import Admin
from preorder.db import Pool
from preorder.errors import Forbidden, Unauthorized, Unavailable, ValidationFailed
from preorder.responses import problems

router = APIRouter(prefix="/api/audit", tags=["audit"])


@router.get("", summary="Read the audit log",
            responses=problems(ValidationFailed, Unauthorized, Forbidden, Unavailable))
async def audit_log(pool: Pool, _: Admin, query: Annotated[AuditQuery, Query()]) -> AuditPage:
    """**Who may call:** admins.

    **Changes:** nothing (the log itself is append-only). Lists every admin action (product create and change
    with before/after, ship, cancel and other status changes an admin made, which include refund decisions):
    who, what, when and from which address, newest first, a page at a time (pass `next_cursor` back as
    `cursor`), optionally only those about one product or order (`target`)."""
    rows = await repo.page(pool, before_id=int(query.cursor) if query.cursor else None, target=query.target,
                           limit=query.limit + 1)
    items = [AuditEntry(**dict(r)) for r in rows[: query.limit]]
    more = len(rows) > query.limit
    return AuditPage(items=items, next_cursor=str(items[-1].id) if more else None)
