"""UsageStore on an SQLite file appends through its own DBAPI connection with constant SQL: the rows it
writes are the rows the SQLAlchemy statements write, the chain runs on across both, writers in
several processes keep one chain, and database errors come out as SQLAlchemy errors."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from metering.chain import GENESIS, chain_hash
from metering.db import is_sqlite_file, make_engine
from metering.events import Outcome, UsageEvent
from metering.sqlite_append import COLUMNS as _COLUMNS
from metering.store_sql import UsageStore, _row
from metering.verify import verify_chain
from serving import db_schema
from tests.metering.conftest import EventFactory

ROOT = Path(__file__).resolve().parents[2]


def _varied(event: EventFactory) -> list[UsageEvent]:
    """Events covering every column type and the awkward values (NULLs, booleans, time zones, 0 µs)."""
    beijing = timezone(timedelta(hours=8))
    return [
        event(),
        event(
            estimated=True,
            stream=True,
            outcome=Outcome.CLIENT_CANCELLED,
            origin_source="header",
            endpoint="completions",
        ),
        event(language=None, worker_id=None, serving_region=None, stream=False),
        event(
            started_at=datetime(2026, 3, 1, 20, 0, 0, tzinfo=beijing),
            finished_at=datetime(2026, 3, 1, 20, 0, 1, 5, tzinfo=beijing),
        ),
        event(
            started_at=datetime(2026, 1, 1, tzinfo=UTC),
            finished_at=datetime(2026, 1, 1, tzinfo=UTC),
            prompt_tokens=0,
            cached_prompt_tokens=0,
            completion_tokens=0,
        ),
        event(prompt_tokens=2**31 - 1, completion_tokens=123_456_789, outcome=Outcome.UPSTREAM_ERROR),
    ]


def _raw_rows(db_file: Path) -> dict[str, tuple[object, ...]]:
    """Every stored column value with its SQLite storage class, by request id, read without SQLAlchemy."""
    cols = ", ".join(f"{c}, typeof({c})" for c in _COLUMNS)
    with sqlite3.connect(db_file) as conn:
        return {r[0]: r for r in conn.execute(f"SELECT {cols} FROM usage_events ORDER BY seq")}


def test_the_raw_path_is_used_on_a_file_and_not_in_memory(engine: Engine) -> None:
    assert is_sqlite_file(engine) and UsageStore(engine)._sqlite is not None
    memory = make_engine("sqlite://")
    assert not is_sqlite_file(memory) and UsageStore(memory)._sqlite is None
    assert not is_sqlite_file(make_engine("sqlite:///:memory:"))


def test_columns_are_the_columns_sqlalchemy_writes(event: EventFactory) -> None:
    assert tuple(_row(event(), datetime(2026, 1, 1), GENESIS, GENESIS, 1)) == _COLUMNS


def test_both_paths_store_identical_rows(engine: Engine, tmp_path: Path, event: EventFactory) -> None:
    store = UsageStore(engine)
    events = _varied(event)
    for e in events:  # each event twice: through SQLAlchemy Core, then through the DBAPI path
        assert store._append_sqlalchemy([replace(e, request_id=e.request_id + "_sa")]) == [
            e.request_id + "_sa"
        ]
        assert store.append_batch([replace(e, request_id=e.request_id + "_raw")]) == [e.request_id + "_raw"]
    rows = _raw_rows(tmp_path / "ledger.db")
    skip = {_COLUMNS.index(c) for c in ("request_id", "recorded_at", "prev_hash", "hash", "tenant_seq")}
    for e in events:
        sa, raw = rows[e.request_id + "_sa"], rows[e.request_id + "_raw"]
        for i, col in enumerate(_COLUMNS):
            if i not in skip:
                assert (col, raw[2 * i], raw[2 * i + 1]) == (col, sa[2 * i], sa[2 * i + 1])
        # recorded_at: same storage class and format (its value is the time of the append)
        i = _COLUMNS.index("recorded_at")
        assert raw[2 * i + 1] == sa[2 * i + 1] == "text"
        assert len(str(raw[2 * i])) == len(str(sa[2 * i])) == len("2026-01-01 00:00:00.000000")
        datetime.strptime(str(raw[2 * i]), "%Y-%m-%d %H:%M:%S.%f")
    # both paths number the tenant's events on one sequence: 1, 2, ... in ledger order
    assert [s.tenant_seq for s in store.iter_events()] == list(range(1, 2 * len(events) + 1))
    # read back identically through SQLAlchemy
    for e in events:
        got_sa, got_raw = store.get(e.request_id + "_sa"), store.get(e.request_id + "_raw")
        assert got_sa is not None and got_raw is not None
        assert replace(got_sa.event, request_id=e.request_id) == replace(
            got_raw.event, request_id=e.request_id
        )
        assert got_raw.event == replace(
            e,
            request_id=e.request_id + "_raw",
            started_at=e.started_at.astimezone(UTC),
            finished_at=e.finished_at.astimezone(UTC),
        )
        assert got_raw.recorded_at.tzinfo is UTC and got_sa.recorded_at.tzinfo is UTC


def test_the_chain_runs_on_across_both_paths(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    appended: list[UsageEvent] = []
    for i in range(12):
        batch = [event() for _ in range(1 + i % 4)] + ([appended[-1]] if appended else [])  # plus a duplicate
        path = store.append_batch if i % 3 else store._append_sqlalchemy
        stored = path(batch)
        assert stored == [e.request_id for e in batch[: 1 + i % 4]]
        appended.extend(batch[: 1 + i % 4])
    assert store.append_batch(appended[:5]) == [] and store._append_sqlalchemy(appended[5:9]) == []
    report = verify_chain(store.iter_events())
    assert report.ok and report.events == len(appended) == store.count()
    assert [s.event for s in store.iter_events()] == [
        replace(e, started_at=e.started_at.astimezone(UTC), finished_at=e.finished_at.astimezone(UTC))
        for e in appended
    ]
    prev = GENESIS
    for s in store.iter_events():
        assert s.prev_hash == prev and s.hash == chain_hash(prev, s.event)
        prev = s.hash


def test_large_batches_are_checked_in_chunks(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    first = [event() for _ in range(700)]
    assert len(store.append_batch(first[:300])) == 300
    again = first + [event() for _ in range(600)]  # 1,300 ids: three "already stored?" queries
    assert len(store.append_batch(again)) == 1000
    assert store.count() == 1300 and verify_chain(store.iter_events()).ok


@pytest.mark.parametrize(("configured", "expected"), [("FULL", 2), ("NORMAL", 1)])
def test_the_writer_connection_has_the_engine_pragmas(
    tmp_path: Path, event: EventFactory, configured: str, expected: int
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}", sqlite_synchronous=configured)
    db_schema.upgrade(engine)
    store = UsageStore(engine)
    store.append_batch([event()])
    conn = store._sqlite._conn  # type: ignore[union-attr]
    assert conn is not None
    assert conn.execute("PRAGMA synchronous").fetchone() == (expected,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (30000,)
    assert conn.isolation_level is None and not conn.in_transaction
    engine.dispose()


def test_an_unknown_synchronous_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        make_engine(f"sqlite:///{tmp_path / 'x.db'}", sqlite_synchronous="FULL; DROP TABLE usage_events")


def test_dispose_closes_the_writer_connection_and_appends_reopen_it(
    engine: Engine, event: EventFactory
) -> None:
    store = UsageStore(engine)
    store.append_batch([event()])
    conn = store._sqlite._conn  # type: ignore[union-attr]
    assert conn is not None
    engine.dispose()
    assert store._sqlite._conn is None  # type: ignore[union-attr]
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")  # closed
    store.append_batch([event()])
    store.close()
    store.append_batch([event()])
    assert store.count() == 3 and verify_chain(store.iter_events()).ok


def test_a_database_error_is_an_sqlalchemy_error_and_the_store_recovers(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    store = UsageStore(engine)
    store.append_batch([event()])
    store._sqlite._conn.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
    blocker = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        with pytest.raises(OperationalError, match="database is locked") as info:
            store.append_batch([event()])
        assert isinstance(info.value, SQLAlchemyError) and isinstance(
            info.value.orig, sqlite3.OperationalError
        )
        assert store._sqlite._conn is None  # type: ignore[union-attr]  # dropped; the next append opens one
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    later = event()
    assert store.append_batch([later]) == [later.request_id]
    assert store.count() == 2 and verify_chain(store.iter_events()).ok


def test_an_error_inside_the_transaction_rolls_it_back(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    store.append_batch([event()])
    bad = replace(event(), prompt_tokens=object())  # type: ignore[arg-type]  # not serializable
    with pytest.raises(TypeError):
        store.append_batch([event(), bad])
    assert store._sqlite._conn is not None and not store._sqlite._conn.in_transaction  # type: ignore[union-attr]
    assert store.count() == 1
    assert len(store.append_batch([event()])) == 1 and verify_chain(store.iter_events()).ok


_WRITER = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime, timedelta
    from metering.db import make_engine
    from metering.events import Outcome, UsageEvent
    from metering.store_sql import UsageStore

    url, name, path = sys.argv[1], sys.argv[2], sys.argv[3]
    engine = make_engine(url)
    store = UsageStore(engine)
    append = store.append_batch if path == "raw" else store._append_sqlalchemy
    t0 = datetime(2026, 3, 1, tzinfo=UTC)

    def ev(rid: str, i: int) -> UsageEvent:
        return UsageEvent(request_id=rid, tenant_id="t", key_id="k", model="m", origin_country="DE",
                          prompt_tokens=i, cached_prompt_tokens=0, completion_tokens=1, stream=i % 2 == 0,
                          outcome=Outcome.OK, started_at=t0 + timedelta(seconds=i),
                          finished_at=t0 + timedelta(seconds=i + 1))

    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(150):
        append([ev(f"req_shared_{i}", i), ev(f"req_{name}_{i}", i)] + [ev(f"req_{name}_{i}_b", i)] * (i % 2))
    engine.dispose()
""")


@pytest.mark.parametrize("paths", [("raw", "raw"), ("raw", "sqlalchemy")])
def test_two_processes_appending_at_once_keep_one_chain(
    engine: Engine, db_url: str, paths: tuple[str, str]
) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, db_url, f"p{k}", path],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k, path in enumerate(paths)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.wait(120) == 0
    for p in procs:  # close our ends of the pipes
        assert p.stdin is not None and p.stdout is not None
        p.stdin.close()
        p.stdout.close()
    store = UsageStore(engine)
    ids = [s.event.request_id for s in store.iter_events()]
    assert len(ids) == len(set(ids)) == 150 + 2 * (150 + 75)
    report = verify_chain(store.iter_events())
    assert report.ok and report.head_seq == store.max_seq() == len(ids)
