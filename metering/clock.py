"""The one clock and calendar of Tokenport: UTC instants, database conversions, billing periods.

Every package reads the time through `utcnow` (tests inject a `Clock` instead), converts to and
from the naive-UTC values the database stores with `to_naive` / `to_aware`, and names a month with
`Period`. Nothing else in the tree defines these.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

Clock = Callable[[], datetime]

_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")


class InvalidPeriod(ValueError):
    """A text that is not a month written YYYY-MM (from 1970-01 to 9998-12)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_aware(value: datetime | None) -> datetime | None:
    """A naive UTC value read from the database, as an aware UTC datetime."""
    return None if value is None else value.replace(tzinfo=UTC)


def to_naive(value: datetime) -> datetime:
    """An aware datetime as the naive UTC value the database stores."""
    return value.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True, order=True)
class Period:
    """A calendar month in UTC, written ``YYYY-MM``: billing periods and monthly budget windows."""

    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Period:
        m = _PERIOD.match(text.strip())
        if m is None or not 1 <= int(m.group(2)) <= 12 or not 1970 <= int(m.group(1)) <= 9998:
            raise InvalidPeriod(
                f"a billing period is a month YYYY-MM from 1970-01 (e.g. 2026-01), got {text!r}"
            )
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def of(cls, day: date | datetime) -> Period:
        return cls(day.year, day.month)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def end(self) -> date:
        """The last day (inclusive)."""
        return date(self.year, self.month, calendar.monthrange(self.year, self.month)[1])

    @property
    def start_at(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end_at(self) -> datetime:
        """The first instant after the period (exclusive bound)."""
        return datetime.combine(self.end + timedelta(days=1), datetime.min.time(), tzinfo=UTC)

    def next(self) -> Period:
        return Period.of(self.end + timedelta(days=1))

    def previous(self) -> Period:
        return Period.of(self.start - timedelta(days=1))
