"""Gapless number series: one counter row per series (prefix + year), incremented in the caller's unit of
work.

A number is taken in the same transaction that writes the numbered document; a failure rolls both
back, so a number is either used by exactly one stored document or never issued. SQLite serializes
writers (every transaction starts with BEGIN IMMEDIATE, see ``metering.db``); PostgreSQL locks the
counter row with ``SELECT ... FOR UPDATE`` and serializes one tenant's finalizations with an
advisory lock (`lock_tenant`).
"""

from __future__ import annotations

from sqlalchemy import select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from billing.tables import counters

_PG_TENANT_LOCK = 7_302_119  # advisory lock class: one tenant's finalizations at a time (PostgreSQL)


def lock_tenant(conn: Connection, tenant_id: str) -> None:
    """Serialize one tenant's numbering transactions (PostgreSQL; SQLite already serializes writers)."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:k, hashtext(:t))"), {"k": _PG_TENANT_LOCK, "t": tenant_id}
        )


def next_number(conn: Connection, series: str) -> int:
    """Increment the series' counter inside the caller's transaction (row locked until commit)."""
    ins = postgresql.insert(counters) if conn.dialect.name == "postgresql" else sqlite.insert(counters)
    conn.execute(ins.values(series=series, last_value=0).on_conflict_do_nothing(index_elements=["series"]))
    last = conn.execute(
        select(counters.c.last_value).where(counters.c.series == series).with_for_update()
    ).scalar_one()
    value = int(last) + 1
    conn.execute(update(counters).where(counters.c.series == series).values(last_value=value))
    return value


def last_number(conn: Connection, series: str) -> int:
    return int(conn.execute(select(counters.c.last_value).where(counters.c.series == series)).scalar() or 0)
