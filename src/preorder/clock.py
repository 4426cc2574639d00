"""The time the order rules read: payment windows, the balance window and the sweeper's deadlines.

The SQL compares deadlines against this clock's `now()`, passed as a parameter, never against PostgreSQL's own
now(): tests move it forward to close a window instead of sleeping through it. In production the offset is 0."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    def __init__(self) -> None:
        self._offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> None:
        """Move time forward (tests only): deadlines that fall before the new now have passed."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._offset += timedelta(seconds=seconds)
