"""Constrained field types shared by request models."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, StrictInt

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_RE = re.compile(ID_PATTERN)
# No control characters: PostgreSQL refuses NUL in text (a 500 otherwise), and the rest have no place in a
# name or a reason that is shown back to people.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
_ISO_8601 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_8601_only(value: object) -> object:
    """Pydantic would also read a number ("0.5") as a Unix time; the schema promises RFC 3339 text only."""
    if isinstance(value, datetime) or (isinstance(value, str) and _ISO_8601.match(value)):
        return value
    raise ValueError("expected an RFC 3339 date-time with a timezone, e.g. 2026-01-31T12:00:00Z")


def _utc_in_range(value: datetime) -> datetime:
    """Normalise to UTC within years 1970-9999: 0001-01-01T00:00+01:00 is year 0 in UTC, which neither
    Python nor the PostgreSQL driver can encode (a 500 otherwise), and no presale lives outside that span."""
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("date-time out of range") from None
    if not 1970 <= utc.year <= 9999:
        raise ValueError("date-time must fall between the years 1970 and 9999")
    return utc


ProductId = Annotated[str, Field(pattern=ID_PATTERN, examples=["P1001"])]
UserId = Annotated[str, Field(pattern=ID_PATTERN, examples=["U123"])]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["USD"])]
MinorUnits = Annotated[StrictInt, Field(ge=0, le=10**12, description="amount in minor units (cents)")]
Text = Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_iso_8601_only), AfterValidator(_utc_in_range)]
__all__ = ["Currency", "MinorUnits", "ProductId", "Text", "Timestamp", "UserId", "datetime"]
