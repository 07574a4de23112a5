"""The one parser of the instants and days that people type (CLI options, API query parameters).

`parse_instant` reads `YYYY-MM-DD` (00:00 UTC), an ISO 8601 timestamp (UTC when it has no offset) or,
where allowed, Unix seconds, and always returns an aware UTC datetime that the database can store:
out-of-range values (year 1 at +14:00, year 9999 at -14:00, huge Unix seconds) raise `InvalidTime`
instead of an OverflowError later. Calendar months are `metering.clock.Period`.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time

from metering.clock import Period

EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)
FORMS = "YYYY-MM-DD, an ISO 8601 timestamp or Unix seconds"


class InvalidTime(ValueError):
    """A typed instant or day that cannot be read or is out of range; `name` is the parameter."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def parse_instant(value: str | None, name: str, *, unix: bool = True) -> datetime | None:
    """An aware UTC datetime (None for None or ""); InvalidTime if unreadable or out of range."""
    if value is None or value == "":
        return None
    v = value.strip()
    forms = FORMS if unix else "YYYY-MM-DD or an ISO 8601 timestamp"
    problem = f"{name} must be {forms}, got {value[:40]!r}"
    try:
        if unix and v.replace(".", "", 1).isdigit():
            seconds = float(v)
            if not math.isfinite(seconds):
                raise InvalidTime(problem, name)
            parsed = datetime.fromtimestamp(seconds, UTC)
        elif len(v) == 10:
            parsed = datetime.combine(date.fromisoformat(v), time(), tzinfo=UTC)
        else:
            parsed = datetime.fromisoformat(v)
    except (ValueError, OverflowError, OSError) as exc:
        if isinstance(exc, InvalidTime):
            raise
        raise InvalidTime(problem, name) from exc
    return checked(parsed, name)


def checked(value: datetime, name: str) -> datetime:
    """`value` in UTC, or InvalidTime when it is outside what can be stored and converted."""
    try:
        utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidTime(f"{name} is out of range (years 0001 to 9999 in UTC)", name) from exc
    if not EARLIEST <= utc <= LATEST:  # pragma: no cover - astimezone raises first
        raise InvalidTime(f"{name} is out of range (years 0001 to 9999 in UTC)", name)
    return utc


def parse_window(
    start: str | None, end: str | None, names: tuple[str, str] = ("start", "end"), *, unix: bool = True
) -> tuple[datetime | None, datetime | None]:
    """A [start, end) window; InvalidTime if either is invalid or end is not after start."""
    s, e = parse_instant(start, names[0], unix=unix), parse_instant(end, names[1], unix=unix)
    if s is not None and e is not None and e <= s:
        raise InvalidTime(f"{names[1]} must be after {names[0]}", names[1])
    return s, e


def parse_day(value: str | None, name: str) -> date | None:
    """A calendar day YYYY-MM-DD (None for None)."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidTime(f"{name} must be YYYY-MM-DD, got {value!r}", name) from exc


def month_bounds(day: date) -> tuple[date, date]:
    """First and last day of the month containing `day` (kept for serving/spend.py until it uses Period)."""
    p = Period.of(day)
    return p.start, p.end
