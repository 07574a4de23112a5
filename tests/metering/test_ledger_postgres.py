"""The ledger suite, run against SQLite (the embedded default) and PostgreSQL (Debian's server, started
on loopback by tests/pg.py): idempotent, group-committed, hash-chained appends; concurrent writers;
the spool when the database is down (fail open) and 503s when configured to fail closed; the hash
chain catching an edited, deleted or reordered event.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from metering.chain import GENESIS
from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.ledger import Ledger, LedgerUnavailable, Spool
from metering.schema import usage_events
from metering.store_sql import UsageStore
from metering.verify import verify_chain
from serving import db_schema
from tests import pg

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def event(
    request_id: str | None = None,
    *,
    tenant: str = "t-a",
    prompt: int = 10,
    completion: int = 5,
    worker: str = "w-0",
    model: str = "m",
    outcome: Outcome = Outcome.OK,
    offset_s: float = 0,
) -> UsageEvent:
    started = T0 + timedelta(seconds=offset_s)
    return UsageEvent(
        request_id=request_id or "req_" + uuid.uuid4().hex,
        tenant_id=tenant,
        key_id="key_1",
        model=model,
        origin_country="DE",
        prompt_tokens=prompt,
        cached_prompt_tokens=min(2, prompt),
        completion_tokens=completion,
        stream=True,
        outcome=outcome,
        started_at=started,
        finished_at=started + timedelta(seconds=1),
        language="en",
        serving_region="r1",
        worker_id=worker,
    )


# --- backends ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg_server() -> Iterator[pg.PgServer]:
    if not pg.available():
        pytest.skip("PostgreSQL binaries not installed (make test installs them)")
    server = pg.PgServer().start()
    try:
        yield server
    finally:
        server.close()


def _pg_database(server: pg.PgServer) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(server.url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return _pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = make_engine(db_url)
    db_schema.upgrade(e)
    try:
        yield e
    finally:
        e.dispose()


@pytest.fixture
def store(engine: Engine) -> UsageStore:
    return UsageStore(engine)


class FlakyStore(UsageStore):
    """A UsageStore whose database can be switched off (OperationalError, like a refused connection)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    def append_batch(self, events):  # type: ignore[no-untyped-def]
        self._check()
        return super().append_batch(events)

    def ping(self) -> None:
        self._check()
        super().ping()


# --- appends -----------------------------------------------------------------------------------------
def test_append_is_idempotent_and_hash_chained(store: UsageStore) -> None:
    a, b = event("req_a"), event("req_b")
    assert store.append_batch([a, b, replace(a, completion_tokens=999)]) == ["req_a", "req_b"]
    assert store.append_batch([a, event("req_c")]) == ["req_c"]
    assert store.count() == 3
    first = store.get("req_a")
    assert first is not None and first.event.completion_tokens == 5 and first.prev_hash == GENESIS
    report = verify_chain(store.iter_events())
    assert report.ok and report.events == 3 and report.head_seq == store.max_seq()


async def test_same_request_id_from_many_tasks_is_stored_once(store: UsageStore, tmp_path: Path) -> None:
    ledger = Ledger(store, Spool(tmp_path / "spool.jsonl"))
    await ledger.start()
    try:
        dup = event("req_dup")
        others = [event() for _ in range(40)]
        await asyncio.gather(*(ledger.append(dup) for _ in range(30)), *(ledger.append(e) for e in others))
    finally:
        await ledger.close()
    with store._engine.connect() as conn:
        n = conn.execute(select(usage_events.c.seq).where(usage_events.c.request_id == "req_dup")).all()
    assert len(n) == 1
    assert store.count() == 41
    assert verify_chain(store.iter_events()).ok


def test_several_processes_appending_the_same_ids_store_each_once(db_url: str) -> None:
    """Four writers with their own engines (like four gateway processes) race on overlapping ids."""
    setup = make_engine(db_url)
    db_schema.upgrade(setup)
    setup.dispose()
    ids = [f"req_{i:03d}" for i in range(60)]
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        e = make_engine(db_url)
        s = UsageStore(e)
        try:
            for i in range(0, len(ids), 5):
                chunk = ids[i : i + 5] if k % 2 == 0 else list(reversed(ids[i : i + 5]))
                s.append_batch([event(r) for r in chunk] + [event(f"req_own_{k}_{i}")])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            e.dispose()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    e = make_engine(db_url)
    s = UsageStore(e)
    rows = [x.event.request_id for x in s.iter_events()]
    assert len(rows) == len(set(rows)) == 60 + 4 * 12
    assert verify_chain(s.iter_events()).ok
    e.dispose()


def test_queries_agree_on_both_backends(store: UsageStore) -> None:
    store.append_batch(
        [
            event(tenant="t-a", prompt=10, completion=5, offset_s=0),
            event(tenant="t-a", prompt=20, completion=7, offset_s=10, outcome=Outcome.CLIENT_CANCELLED),
            event(tenant="t-b", prompt=30, completion=9, offset_s=20, worker="w-1"),
        ]
    )
    rows = store.summary(["tenant_id"])
    assert rows == [
        {
            "tenant_id": "t-a",
            "requests": 2,
            "prompt_tokens": 30,
            "cached_prompt_tokens": 4,
            "completion_tokens": 12,
        },
        {
            "tenant_id": "t-b",
            "requests": 1,
            "prompt_tokens": 30,
            "cached_prompt_tokens": 2,
            "completion_tokens": 9,
        },
    ]
    assert store.summary(["tenant_id"], limit=1, offset=1)[0]["tenant_id"] == "t-b"
    assert [e.event.prompt_tokens for e in store.iter_events(start=T0 + timedelta(seconds=5))] == [20, 30]
    w0 = store.worker_totals("w-0", "m", after_seq=0, upto_seq=store.max_seq(), started_from=T0)
    assert (w0.requests, w0.prompt_tokens, w0.completion_tokens, w0.cut_off) == (2, 30, 12, 1)
    later = store.worker_totals(
        "w-0", "m", after_seq=0, upto_seq=store.max_seq(), started_from=T0 + timedelta(seconds=5)
    )
    assert later.requests == 1


def test_snapshots_round_trip(store: UsageStore) -> None:
    rows = [
        {
            "taken_at": T0,
            "worker_id": "w-0",
            "model": "m",
            "counters_epoch": 1000.5,
            "prompt_tokens": 10,
            "cached_prompt_tokens": 1,
            "completion_tokens": 3,
            "ledger_seq": 4,
        },
        {
            "taken_at": T0 + timedelta(minutes=5),
            "worker_id": "w-0",
            "model": "m",
            "counters_epoch": 1000.5,
            "prompt_tokens": 20,
            "cached_prompt_tokens": 2,
            "completion_tokens": 6,
            "ledger_seq": 9,
        },
    ]
    store.save_snapshots(rows)
    got = store.snapshot_before("w-0", "m", T0 + timedelta(minutes=1), 1000.5)
    assert got is not None and got.ledger_seq == 4 and got.taken_at == T0
    assert store.snapshot_before("w-0", "m", T0 + timedelta(minutes=9), 1000.5).ledger_seq == 9  # type: ignore[union-attr]
    assert store.snapshot_before("w-0", "m", T0 + timedelta(minutes=9), 2000.0) is None  # another process
    assert store.snapshot_before("w-0", "m", T0 - timedelta(minutes=1), 1000.5) is None


# --- the database goes away --------------------------------------------------------------------------
async def test_fail_open_spools_and_replays_without_duplicates(engine: Engine, tmp_path: Path) -> None:
    store = FlakyStore(engine)
    spool = Spool(tmp_path / "spool" / "usage.jsonl")
    ledger = Ledger(store, spool, replay_interval_s=0.05)
    await ledger.start()
    try:
        await ledger.append(event("req_before"))
        store.down = True
        down = [event() for _ in range(10)]
        await asyncio.gather(*(ledger.append(e) for e in down))  # durable in the spool: no error
        assert not ledger.available and {e.request_id for e in spool.read()} == {e.request_id for e in down}
        # an event that was committed AND spooled (a commit whose acknowledgement was lost)
        UsageStore(engine).append_batch([down[0]])
        store.down = False
        deadline = asyncio.get_running_loop().time() + 5
        while spool.pending():  # replayed with no new request coming in
            assert asyncio.get_running_loop().time() < deadline, "spool not replayed"
            await asyncio.sleep(0.02)
        await ledger.append(event("req_after"))
    finally:
        await ledger.close()
    ids = [s.event.request_id for s in store.iter_events()]
    assert len(ids) == len(set(ids)) == 12
    assert ids[0] == "req_before" and ids[-1] == "req_after"
    assert verify_chain(store.iter_events()).ok


async def test_fail_closed_refuses_while_the_database_is_down(engine: Engine, tmp_path: Path) -> None:
    store = FlakyStore(engine)
    ledger = Ledger(store, Spool(tmp_path / "spool.jsonl"), fail_closed=True)
    await ledger.start()
    try:
        await ledger.admit()
        store.down = True
        with pytest.raises(LedgerUnavailable):
            await ledger.append(event())
        with pytest.raises(LedgerUnavailable):
            await ledger.admit()
        assert not (tmp_path / "spool.jsonl").exists()
        store.down = False
        ledger._last_probe = 0.0  # the next admission re-probes (at most once a second)
        await ledger.admit()
        await ledger.append(event("req_back"))
    finally:
        await ledger.close()
    assert store.count() == 1 and store.get("req_back") is not None


def test_spool_shared_by_writers_while_another_process_replays(store: UsageStore, tmp_path: Path) -> None:
    """Writers appending while replays run (rename aside + flock): every event lands exactly once."""
    path = tmp_path / "spool.jsonl"
    written: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def write(k: int) -> None:
        spool = Spool(path)
        for i in range(40):
            e = event(f"req_w{k}_{i}")
            spool.write([e])
            with lock:
                written.append(e.request_id)

    def replay() -> None:
        spool = Spool(path)
        while not stop.is_set():
            spool.replay(store)

    writers = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    replayer = threading.Thread(target=replay)
    replayer.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    replayer.join(60)
    Spool(path).replay(store)
    assert not Spool(path).pending()
    ids = [s.event.request_id for s in store.iter_events()]
    assert sorted(ids) == sorted(written) and len(ids) == 120


@pytest.mark.timeout(120)
async def test_real_postgres_outage_spools_then_replays(tmp_path: Path) -> None:
    if not pg.available():
        pytest.skip("PostgreSQL binaries not installed")
    server = pg.PgServer().start()
    try:
        engine = make_engine(server.url)
        db_schema.upgrade(engine)
        store = UsageStore(engine)
        spool = Spool(tmp_path / "usage.jsonl")
        ledger = Ledger(store, spool, replay_interval_s=0.2)
        await ledger.start()
        await ledger.append(event("req_0"))
        await asyncio.to_thread(server.stop)
        during = [event() for _ in range(5)]
        await asyncio.gather(*(ledger.append(e) for e in during))
        assert len(spool.read()) == 5
        await asyncio.to_thread(server.start)
        await ledger.append(event("req_1"))  # replays the spool first, then commits
        await ledger.close()
        ids = [s.event.request_id for s in store.iter_events()]
        assert ids[0] == "req_0" and ids[-1] == "req_1" and len(ids) == len(set(ids)) == 7
        assert not spool.pending() and verify_chain(store.iter_events()).ok
        engine.dispose()
    finally:
        server.close()


# --- tamper evidence ---------------------------------------------------------------------------------
def _five(store: UsageStore) -> list[int]:
    store.append_batch([event(f"req_{i}", completion=i + 1) for i in range(5)])
    return [s.seq for s in store.iter_events()]


def test_chain_detects_an_edited_event(store: UsageStore, engine: Engine) -> None:
    seqs = _five(store)
    with engine.begin() as conn:
        conn.execute(update(usage_events).where(usage_events.c.seq == seqs[2]).values(completion_tokens=1))
    report = verify_chain(store.iter_events())
    assert report.first_break is not None
    assert (report.first_break.kind, report.first_break.seq, report.first_break.request_id) == (
        "edited",
        seqs[2],
        "req_2",
    )
    assert report.events == 2


def test_chain_detects_a_deleted_event(store: UsageStore, engine: Engine) -> None:
    seqs = _five(store)
    with engine.begin() as conn:
        conn.execute(delete(usage_events).where(usage_events.c.seq == seqs[1]))
    report = verify_chain(store.iter_events())
    assert report.first_break is not None
    assert (report.first_break.kind, report.first_break.seq) == ("broken_link", seqs[2])


def test_chain_detects_reordered_events(store: UsageStore, engine: Engine) -> None:
    seqs = _five(store)
    a, b = seqs[1], seqs[3]
    with engine.begin() as conn:  # swap the positions of two events
        conn.execute(update(usage_events).where(usage_events.c.seq == a).values(seq=-1))
        conn.execute(update(usage_events).where(usage_events.c.seq == b).values(seq=a))
        conn.execute(update(usage_events).where(usage_events.c.seq == -1).values(seq=b))
    report = verify_chain(store.iter_events())
    assert report.first_break is not None
    assert (report.first_break.kind, report.first_break.seq) == ("broken_link", a)


def test_anchor_detects_a_cut_off_tail_and_a_rewritten_history(store: UsageStore, engine: Engine) -> None:
    seqs = _five(store)
    head = verify_chain(store.iter_events())
    assert head.ok and head.head_seq == seqs[-1]
    assert verify_chain(store.iter_events(), {head.head_seq: head.head_hash}).anchors_checked == 1
    with engine.begin() as conn:
        conn.execute(delete(usage_events).where(usage_events.c.seq >= seqs[3]))
    cut = verify_chain(store.iter_events(), {head.head_seq: head.head_hash})
    assert cut.first_break is not None and cut.first_break.kind == "anchor"
    assert "cut off" in cut.first_break.detail


# --- bounded wait, per-tenant positions (both backends) -------------------------------------------------
def test_an_append_waits_for_a_held_chain_lock_at_most_append_wait_s(engine: Engine, db_url: str) -> None:
    """Another writer holding the chain's lock (SQLite's write lock, PostgreSQL's advisory lock) fails the
    append after `append_wait_s`, so that the ledger spools instead of stalling its requests."""
    import time

    store = UsageStore(engine, append_wait_s=0.3)
    holder = create_engine(db_url) if db_url.startswith("postgresql") else make_engine(db_url)
    with holder.connect() as conn:
        if db_url.startswith("postgresql"):
            conn.execute(text("SELECT pg_advisory_lock(7302118)"))
        else:
            conn.exec_driver_sql(
                "INSERT INTO registry_version (id, version) VALUES (99, 1)"
            )  # BEGIN IMMEDIATE held
        t0 = time.monotonic()
        with pytest.raises(OperationalError):
            store.append_batch([event()])
        assert time.monotonic() - t0 < 5
        conn.rollback()
        if db_url.startswith("postgresql"):
            conn.execute(text("SELECT pg_advisory_unlock(7302118)"))
    holder.dispose()
    assert store.append_batch([e := event()]) == [e.request_id]


def test_tenant_positions_on_both_backends(store: UsageStore) -> None:
    store.append_batch([event(tenant="a"), event(tenant="b"), event(tenant="a")])
    store.append_batch([event(tenant="b"), event(tenant="a")])
    assert [(s.event.tenant_id, s.tenant_seq) for s in store.iter_events()] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 3),
    ]


def test_postgres_tenant_heads_probe_the_index_not_every_event(pg_server: pg.PgServer) -> None:
    """The next tenant_seq is read inside the chain lock: one index probe per tenant, not a read of
    all of a tenant's events (the GROUP BY form did that: O(events) per commit)."""
    engine = make_engine(_pg_database(pg_server))
    db_schema.upgrade(engine)
    try:
        store = UsageStore(engine)
        store.append_batch([event(tenant="big") for _ in range(2000)])
        with engine.begin() as conn:
            conn.execute(text("ANALYZE usage_events"))
        store.append_batch([event(tenant="big"), event(tenant="new")])
        assert [(s.event.tenant_id, s.tenant_seq) for s in store.iter_events(after_seq=2000)] == [
            ("big", 2001),
            ("new", 1),
        ]
        from metering.store_sql import _PG_SELECT_TENANT_HEADS

        with engine.connect() as conn:
            plan = conn.execute(
                text("EXPLAIN (ANALYZE, FORMAT JSON) " + _PG_SELECT_TENANT_HEADS.text),
                {"tenants": ["big", "new"]},
            ).scalar_one()
        rows_read: list[int] = []

        def walk(node: dict[str, object]) -> None:
            if node.get("Relation Name") == "usage_events":
                rows_read.append(int(node["Actual Rows"]) * int(node["Actual Loops"]))  # type: ignore[call-overload]
            for child in node.get("Plans", []):  # type: ignore[attr-defined]
                walk(child)

        walk(plan[0]["Plan"])
        assert rows_read and sum(rows_read) <= 2, plan
    finally:
        engine.dispose()
