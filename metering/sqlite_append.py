"""Usage-ledger appends to an SQLite file through the raw sqlite3 driver (UsageStore uses it there).

Constant SQL on one long-lived connection: 113 µs of CPU per single-event transaction at
synchronous=FULL against 634 µs through SQLAlchemy Core (bench/results/profile-2026-11-24.md). The
rows are exactly those of the SQLAlchemy path (tests/metering/test_store_sqlite_raw.py compares them).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import weakref
from dataclasses import fields
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from metering.chain import GENESIS, IN_CHUNK, TenantPositions, chain_hash
from metering.clock import utcnow
from metering.db import dedicated_sqlite_connection
from metering.event_codec import codec, sqlite_time
from metering.events import UsageEvent

# The same statements as constant SQL for the DBAPI path on SQLite. The columns are the event's fields
# (metering/events.py) and the chain's; the values are what the SQLAlchemy path writes (`_row` and
# `_sqlite_row`; tests compare the stored rows).
COLUMNS: tuple[str, ...] = (
    *(f.name for f in fields(UsageEvent)),
    "recorded_at",
    "prev_hash",
    "hash",
    "tenant_seq",
)
_SQLITE_INSERT = f"INSERT INTO usage_events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_SQLITE_HEAD = "SELECT hash FROM usage_events ORDER BY seq DESC LIMIT 1"
SQLITE_FULL = 2  # PRAGMA synchronous


@functools.lru_cache(maxsize=IN_CHUNK)
def _sqlite_existing(n: int) -> str:
    return f"SELECT request_id FROM usage_events WHERE request_id IN ({', '.join('?' * n)})"


@functools.lru_cache(maxsize=IN_CHUNK)
def _sqlite_tenant_heads(n: int) -> str:
    return (
        f"SELECT tenant_id, MAX(tenant_seq) FROM usage_events WHERE tenant_id IN ({', '.join('?' * n)}) "
        "GROUP BY tenant_id"
    )


def _sqlite_row(
    e: UsageEvent, recorded_at: str, prev_hash: str, h: str, tenant_seq: int
) -> tuple[object, ...]:
    return (*codec().sqlite_values(e), recorded_at, prev_hash, h, tenant_seq)


class SqliteAppender:
    """Appends to an SQLite file through one long-lived DBAPI connection of its own.

    Same transaction as the SQLAlchemy path: BEGIN IMMEDIATE (serializes writers across processes),
    skip the request ids already stored, read the chain head, insert the new rows, COMMIT. The
    connection is made by the engine (same PRAGMAs, same `sqlite_synchronous`) and used under a lock,
    so any thread may append. A connection that raised a database error is closed and replaced at the
    next append; one inherited across fork() is left alone. `engine.dispose()` closes it.
    """

    def __init__(self, engine: Engine, *, wait_s: float | None = None) -> None:
        self._engine = engine
        # How long BEGIN IMMEDIATE waits for another writer's lock before failing ("database is
        # locked"); None: the engine's busy timeout (30 s).
        self.wait_s = wait_s
        self._positions = TenantPositions()  # tenant_seq heads, valid while nobody else appends
        self._lock = threading.Lock()
        self.autocheckpoint = True  # False: WAL checkpoints are someone else's job (Ledger's checkpointer)
        self._conn: sqlite3.Connection | None = None
        self._cur: sqlite3.Cursor | None = None
        self._handle: Any = None
        self._pid = 0
        self._inherited: list[Any] = []  # connections opened by a parent process: never used nor closed
        me = weakref.ref(self)

        def on_dispose(_engine: Engine) -> None:
            appender = me()
            if appender is not None:
                appender.close()

        event.listen(engine, "engine_disposed", on_dispose)
        weakref.finalize(self, event.remove, engine, "engine_disposed", on_dispose).atexit = False

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _discard(self) -> None:
        handle, self._handle, self._conn, self._cur = self._handle, None, None, None
        if handle is None:
            return
        if self._pid != os.getpid():
            self._inherited.append(handle)
            return
        with contextlib.suppress(Exception):
            handle.close()

    def _cursor(self) -> sqlite3.Cursor:
        if self._cur is None or self._pid != os.getpid():
            self._discard()
            self._conn, self._handle = dedicated_sqlite_connection(self._engine)
            self._pid = os.getpid()
            self._cur = self._conn.cursor()
            if not self.autocheckpoint:
                self._cur.execute("PRAGMA wal_autocheckpoint=0")
            if self.wait_s is not None:
                self._cur.execute(f"PRAGMA busy_timeout={max(0, round(self.wait_s * 1000))}")
        return self._cur

    def synchronous(self) -> int:
        """The connections' PRAGMA synchronous (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA)."""
        conn, handle = dedicated_sqlite_connection(self._engine)
        try:
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])
        finally:
            handle.close()

    def checkpoint(self) -> None:
        """A PASSIVE WAL checkpoint on a connection of its own: it copies what it can into the
        database file while appends go on, and never waits for them."""
        conn, handle = dedicated_sqlite_connection(self._engine)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            handle.close()

    def append(self, unique: dict[str, UsageEvent]) -> list[str]:
        with self._lock:
            stmt = "BEGIN IMMEDIATE"
            params: Any = None
            try:
                cur = self._cursor()
                cur.execute(stmt)
                ids = list(unique)
                existing: set[str] = set()
                for i in range(0, len(ids), IN_CHUNK):
                    params = ids[i : i + IN_CHUNK]
                    stmt = _sqlite_existing(len(params))
                    existing.update(r[0] for r in cur.execute(stmt, params))
                params = None
                fresh = [e for rid, e in unique.items() if rid not in existing]
                if fresh:
                    stmt = _SQLITE_HEAD
                    head = cur.execute(stmt).fetchone()
                    prev = (head[0] if head is not None else None) or GENESIS
                    tenants = self._positions.begin(prev, (e.tenant_id for e in fresh))
                    for i in range(0, len(tenants), IN_CHUNK):
                        params = tenants[i : i + IN_CHUNK]
                        stmt = _sqlite_tenant_heads(len(params))
                        self._positions.found(params, dict(cur.execute(stmt, params).fetchall()))
                    now = sqlite_time(utcnow())
                    rows = []
                    for e in fresh:
                        h = chain_hash(prev, e)
                        rows.append(_sqlite_row(e, now, prev, h, self._positions.take(e.tenant_id)))
                        prev = h
                    stmt, params = _SQLITE_INSERT, rows
                    cur.executemany(stmt, rows)
                    params = None
                stmt = "COMMIT"
                cur.execute(stmt)
                if fresh:
                    self._positions.committed(prev)
            except sqlite3.Error as exc:
                self._discard()  # closing rolls back whatever is open
                raise DBAPIError.instance(stmt, params, exc, sqlite3.Error, hide_parameters=True) from exc
            except BaseException:
                self._rollback()
                raise
        return [e.request_id for e in fresh]

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._discard()
