"""Audit request and response models."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from preorder.types import ID_PATTERN


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cursor: str | None = Field(default=None, pattern=r"^[0-9]{1,19}$", description="next_cursor of the previous page")
    limit: int = Field(default=50, ge=1, le=200)
    target: str | None = Field(default=None, pattern=ID_PATTERN,
                               description="only the entries about this product id or order id")


class AuditEntry(BaseModel):
    id: int
    at: datetime
    actor: str = Field(description="the admin's token subject")
    client: str = Field(description="the client address the request came from")
    action: str = Field(examples=["product.update"])
    target: str = Field(description="the product id or order id acted on")
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next_cursor: str | None
