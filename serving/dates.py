"""Calendar helpers shared by the CLI and the APIs (billing periods are UTC calendar months)."""

from __future__ import annotations

import calendar
from datetime import date


def month_bounds(day: date) -> tuple[date, date]:
    """First and last day of the month containing `day`."""
    last = calendar.monthrange(day.year, day.month)[1]
    return day.replace(day=1), day.replace(day=last)
