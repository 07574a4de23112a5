"""Database engines: SQLite (embedded default, WAL) or PostgreSQL, chosen by URL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import SingletonThreadPool, StaticPool

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, sqlite_synchronous: str = "FULL") -> Engine:
    """An engine with the settings the ledger relies on.

    SQLite: WAL journal, a busy timeout, and every transaction started with BEGIN IMMEDIATE so that
    read-then-write transactions (the hash chain) are serialized across processes without
    deadlocking (SQLAlchemy's documented pysqlite recipe). `sqlite_synchronous` FULL (the default)
    fsyncs every commit: a committed usage event survives a power loss; NORMAL survives a crash of
    the process only.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        synchronous = sqlite_synchronous.upper()
        if synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(
                f"sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, "
                f"not {sqlite_synchronous!r}"
            )
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let BEGIN below control transactions
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # connect_timeout: an unreachable server fails fast, so the ledger spools instead of hanging
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {},
    )


def is_sqlite_file(engine: Engine) -> bool:
    """SQLite on a file, with a pool of separate connections (not `:memory:` or a shared-cache memory
    database, where every connection of the engine is one and the same)."""
    if not is_sqlite(engine) or isinstance(engine.pool, SingletonThreadPool | StaticPool):
        return False
    database = engine.url.database
    return bool(database) and database != ":memory:" and engine.url.query.get("mode") != "memory"


def dedicated_sqlite_connection(engine: Engine) -> tuple[sqlite3.Connection, Any]:
    """A DBAPI connection of its own to the engine's SQLite file, set up exactly like the engine's
    pooled connections (it is made by the engine: same connect arguments, same `connect` hook, so the
    same PRAGMAs, including `sqlite_synchronous`; the driver in autocommit mode so that BEGIN/COMMIT
    are explicit), then detached from the pool. Returns the sqlite3 connection and the handle whose
    `close()` closes it; the caller owns both."""
    if not is_sqlite_file(engine):
        raise ValueError(f"not an SQLite file database: {engine.url!r}")
    handle = engine.raw_connection()
    conn = handle.driver_connection
    handle.detach()
    assert isinstance(conn, sqlite3.Connection)
    return conn, handle
