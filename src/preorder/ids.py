"""Time-ordered ids (UUIDv7): inserts stay index-friendly and ids sort by creation time."""

from __future__ import annotations

import uuid

from uuid_utils import compat


def new_id() -> uuid.UUID:
    return compat.uuid7()
