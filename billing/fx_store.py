"""Persistence of imported FX rates (never changed once stored).

Functions take the connection of the caller's unit of work (billing/store.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from billing.errors import DocumentStateError
from billing.fx import FxRate
from billing.tables import fx_corrections, fx_rates
from metering.clock import to_naive


def all_rates(conn: Connection) -> list[FxRate]:
    rows = (
        conn.execute(select(fx_rates).order_by(fx_rates.c.rate_date, fx_rates.c.base, fx_rates.c.quote))
        .mappings()
        .all()
    )
    return [FxRate(r["rate_date"], r["base"], r["quote"], Decimal(r["rate"]), r["source"]) for r in rows]


def corrections(conn: Connection) -> list[tuple[FxRate, str, str]]:
    """Every superseding row, oldest first: (the rate now used, the rate it replaced, the reason)."""
    rows = conn.execute(select(fx_corrections).order_by(fx_corrections.c.id)).mappings().all()
    return [
        (
            FxRate(r["rate_date"], r["base"], r["quote"], Decimal(r["rate"]), r["source"]),
            r["supersedes"],
            r["reason"],
        )
        for r in rows
    ]


def supersede(conn: Connection, rate: FxRate, *, replaces: Decimal, reason: str, now: datetime) -> None:
    conn.execute(
        insert(fx_corrections).values(
            rate_date=rate.date,
            base=rate.base,
            quote=rate.quote,
            rate=format(rate.rate, "f"),
            source=rate.source,
            supersedes=format(replaces, "f"),
            reason=reason,
            corrected_at=to_naive(now),
        )
    )


def add(conn: Connection, rates: Sequence[FxRate], *, origin: str, now: datetime) -> int:
    """Store rates not stored yet (same date, pair and rate: skipped); returns how many were new.

    The caller has checked that no rate contradicts a stored or configured one.
    """
    added = 0
    for r in rates:
        found = conn.execute(
            select(fx_rates.c.rate).where(
                fx_rates.c.rate_date == r.date, fx_rates.c.base == r.base, fx_rates.c.quote == r.quote
            )
        ).scalar()
        if found is not None:
            if Decimal(found) != r.rate:
                raise DocumentStateError(f"{r.base}/{r.quote} {r.date}: a different rate {found} is stored")
            continue
        conn.execute(
            insert(fx_rates).values(
                rate_date=r.date,
                base=r.base,
                quote=r.quote,
                rate=format(r.rate, "f"),
                source=r.source,
                origin=origin,
                imported_at=to_naive(now),
            )
        )
        added += 1
    return added
