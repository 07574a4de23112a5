"""Persistence of month closes: per period, the ledger mark of the last run over all tenants and the close.

Functions take the connection of the caller's unit of work (billing/store.py).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from billing.tables import periods
from metering.clock import to_naive


def record_run(conn: Connection, period: str, mark: int, now: datetime) -> None:
    """Remember the ledger mark of a run over all tenants (only while the period is open)."""
    row = conn.execute(select(periods).where(periods.c.period == period).with_for_update()).mappings().first()
    if row is None:
        conn.execute(insert(periods).values(period=period, run_mark=mark, run_at=to_naive(now)))
    elif row["closed_at"] is None:
        conn.execute(
            update(periods)
            .where(periods.c.period == period)
            .values(run_mark=max(mark, int(row["run_mark"])), run_at=to_naive(now))
        )


def close(conn: Connection, period: str, now: datetime) -> int:
    """Mark the period closed for every tenant without a pending draft; returns the close mark."""
    row = conn.execute(select(periods).where(periods.c.period == period).with_for_update()).mappings().first()
    if row is None:
        conn.execute(
            insert(periods).values(period=period, run_mark=0, closed_mark=0, closed_at=to_naive(now))
        )
        return 0
    if row["closed_at"] is None:
        conn.execute(
            update(periods)
            .where(periods.c.period == period)
            .values(closed_mark=row["run_mark"], closed_at=to_naive(now))
        )
        return int(row["run_mark"])
    return int(row["closed_mark"] or 0)


def was_run(conn: Connection, period: str) -> bool:
    """Whether a run over all tenants was recorded for the period."""
    return conn.execute(select(periods.c.run_at).where(periods.c.period == period)).scalar() is not None


def closed_periods(conn: Connection) -> dict[str, int]:
    """Closed period -> close mark (every event of a tenant without rows there is above it)."""
    rows = conn.execute(
        select(periods.c.period, periods.c.closed_mark).where(periods.c.closed_at.is_not(None))
    ).all()
    return {p: int(m or 0) for p, m in rows}
