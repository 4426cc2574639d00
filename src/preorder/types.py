"""Constrained field types shared by request models."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AwareDatetime, Field, StrictInt

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

ProductId = Annotated[str, Field(pattern=ID_PATTERN, examples=["P1001"])]
UserId = Annotated[str, Field(pattern=ID_PATTERN, examples=["U123"])]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["USD"])]
MinorUnits = Annotated[StrictInt, Field(ge=0, le=10**12, description="amount in minor units (cents)")]
Timestamp = AwareDatetime
__all__ = ["Currency", "MinorUnits", "ProductId", "Timestamp", "UserId", "datetime"]
