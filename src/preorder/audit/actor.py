"""Who is acting and from where: the admin dependency the audited routes take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from preorder.audit.repository import Entry
from preorder.auth import Principal, admin_user


def client_address(request: Request) -> str:
    """The peer's address (behind a proxy, run uvicorn with --forwarded-allow-ips so this is the real client)."""
    return request.client.host if request.client else "unknown"


@dataclass(frozen=True, slots=True)
class Actor:
    principal: Principal
    client: str

    def did(self, action: str, target: str, *, before: dict[str, Any] | None = None,
            after: dict[str, Any] | None = None) -> Entry:
        return Entry(actor=self.principal.sub, client=self.client, action=action, target=target, before=before,
                     after=after)


async def admin_actor(request: Request, principal: Annotated[Principal, Depends(admin_user)]) -> Actor:
    return Actor(principal, client_address(request))


AdminActor = Annotated[Actor, Depends(admin_actor)]
