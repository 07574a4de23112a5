"""The Ledger: group commit, durability via the spool when the database fails, idempotent replay."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from metering.db import make_engine
from metering.event_codec import codec
from metering.events import Outcome, UsageEvent
from metering.ledger import Ledger, LedgerUnavailable, Spool
from metering.store_sql import UsageStore
from serving import db_schema
from tests.metering.conftest import EventFactory


class FlakyStore:
    """A UsageStore whose database can be 'down' (raises OperationalError like a lost connection)."""

    def __init__(self, real: UsageStore) -> None:
        self.real = real
        self.down = False
        self.calls: list[list[str]] = []

    def append_batch(self, events: Sequence[UsageEvent]) -> list[str]:
        self.calls.append([e.request_id for e in events])
        if self.down:
            raise OperationalError("INSERT INTO usage_events ...", {}, Exception("database is unreachable"))
        return self.real.append_batch(events)

    def checkpoint_in_background(self) -> bool:
        return self.real.checkpoint_in_background()

    def checkpoint(self) -> None:
        self.real.checkpoint()


class Commits:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, seconds: float, events: int) -> None:
        assert seconds >= 0
        self.batches.append(events)


def test_event_json_round_trip(event: EventFactory) -> None:
    e = event(outcome=Outcome.UPSTREAM_ERROR, estimated=True, language=None, worker_id=None)
    assert codec().from_json(codec().to_json(e)) == e


async def test_group_commit_stores_all_in_fewer_commits(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    store = UsageStore(engine)
    commits = Commits()
    ledger = Ledger(store, Spool(tmp_path / "spool.jsonl"), on_commit=commits)
    await ledger.start()
    try:
        events = [event() for _ in range(300)]
        await asyncio.gather(*(ledger.append(e) for e in events))
        # append returned: every event is durable now
        assert store.count() == 300
        assert sum(commits.batches) == 300
        assert len(commits.batches) < 300 / 10, commits.batches
        # the same events again: no new rows
        await asyncio.gather(*(ledger.append(e) for e in events[:50]))
        assert store.count() == 300
    finally:
        await ledger.close()
    assert not (tmp_path / "spool.jsonl").exists()


async def test_batches_respect_max_batch(engine: Engine, tmp_path: Path, event: EventFactory) -> None:
    commits = Commits()
    ledger = Ledger(UsageStore(engine), Spool(tmp_path / "s.jsonl"), max_batch=16, on_commit=commits)
    await ledger.start()
    try:
        await asyncio.gather(*(ledger.append(event()) for _ in range(100)))
    finally:
        await ledger.close()
    assert sum(commits.batches) == 100 and max(commits.batches) <= 16


async def test_close_flushes_what_is_queued(engine: Engine, tmp_path: Path, event: EventFactory) -> None:
    store = UsageStore(engine)
    ledger = Ledger(store, Spool(tmp_path / "s.jsonl"))
    await ledger.start()
    futures = [ledger.append_nowait(event()) for _ in range(40)]
    await ledger.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert store.count() == 40


async def test_database_outage_spools_and_replays_without_duplicates(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    real = UsageStore(engine)
    flaky = FlakyStore(real)
    spool_path = tmp_path / "spool" / "usage.jsonl"
    ledger = Ledger(flaky, Spool(spool_path), replay_interval_s=0.05)  # type: ignore[arg-type]
    await ledger.start()
    try:
        flaky.down = True
        down_events = [event() for _ in range(5)]
        # append still returns (the events are fsync'd to the spool), it does not raise
        await asyncio.gather(*(ledger.append(e) for e in down_events))
        await ledger.append(down_events[0])  # a duplicate while down is spooled again
        assert real.count() == 0
        spooled = Spool(spool_path).read()
        assert {e.request_id for e in spooled} == {e.request_id for e in down_events}
        assert spooled[0] == down_events[0]

        flaky.down = False
        await asyncio.sleep(
            0.06
        )  # the next commit replays the spool first (one attempt per replay_interval_s)
        up = event()
        await ledger.append(up)
        stored = [s.event for s in real.iter_events()]
        # spooled events first, then the new one; each exactly once
        assert [e.request_id for e in stored] == [e.request_id for e in down_events] + [up.request_id]
        assert stored[:5] == down_events
        assert not spool_path.exists()

        await ledger.append(down_events[1])  # replaying / re-recording never duplicates
        assert real.count() == 6
    finally:
        await ledger.close()


async def test_spool_left_by_a_previous_process_is_replayed_at_start(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    store = UsageStore(engine)
    spool = Spool(tmp_path / "usage.jsonl")
    already = event()
    store.append_batch([already])
    spool.write([event(), already, event()])
    spool.path.write_bytes(
        spool.path.read_bytes() + b'{"request_id": "torn'
    )  # a torn write: skipped, not fatal
    ledger = Ledger(store, spool)
    await ledger.start()
    await ledger.close()
    assert store.count() == 3
    assert not spool.path.exists()


async def test_replay_that_fails_keeps_the_spool(engine: Engine, tmp_path: Path, event: EventFactory) -> None:
    flaky = FlakyStore(UsageStore(engine))
    spool = Spool(tmp_path / "usage.jsonl")
    spool.write([event(), event()])
    flaky.down = True
    ledger = Ledger(flaky, spool, replay_interval_s=0.05)  # type: ignore[arg-type]
    await ledger.start()  # must not raise while the database is down
    try:
        await ledger.append(event())
        assert len(spool.read()) == 3
        flaky.down = False
        await asyncio.sleep(0.06)
        await ledger.append(event())
        assert flaky.real.count() == 4
        assert not spool.path.exists()
    finally:
        await ledger.close()


async def test_fail_closed_raises_instead_of_spooling(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    flaky = FlakyStore(UsageStore(engine))
    flaky.down = True
    ledger = Ledger(flaky, Spool(tmp_path / "usage.jsonl"), fail_closed=True)  # type: ignore[arg-type]
    await ledger.start()
    try:
        with pytest.raises(LedgerUnavailable):
            await ledger.append(event())
        assert not (tmp_path / "usage.jsonl").exists()
        flaky.down = False
        await ledger.append(event())  # the writer survived the failure
        assert flaky.real.count() == 1
    finally:
        await ledger.close()


# --- the writer thread ---------------------------------------------------------------------------
class ThreadRecordingStore:
    """A UsageStore that notes which thread each commit ran on (and can be slow or fail once)."""

    def __init__(self, real: UsageStore, delay_s: float = 0.0) -> None:
        self.real = real
        self.delay_s = delay_s
        self.threads: set[int] = set()
        self.batches: list[int] = []
        self.fail_next: BaseException | None = None

    def append_batch(self, events: Sequence[UsageEvent]) -> list[str]:
        self.threads.add(threading.get_ident())
        self.batches.append(len(events))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return self.real.append_batch(events)

    def checkpoint_in_background(self) -> bool:
        return False  # no checkpointer thread: only the writer's threads are recorded


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ledger-writer"]


async def test_one_writer_thread_commits_and_callbacks_run_on_the_loop(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    loop_thread = threading.get_ident()
    store = ThreadRecordingStore(UsageStore(engine))
    callback_threads: list[int] = []
    before = set(_writer_threads())
    ledger = Ledger(
        store,  # type: ignore[arg-type]
        Spool(tmp_path / "s.jsonl"),
        on_commit=lambda _s, _n: callback_threads.append(threading.get_ident()),
    )
    await ledger.start()
    mine = [t for t in _writer_threads() if t not in before]
    assert len(mine) == 1 and mine[0].daemon
    try:
        for _ in range(5):
            await ledger.append(event())
        await asyncio.gather(*(ledger.append(event()) for _ in range(50)))
        futures = [ledger.append_nowait(event()) for _ in range(20)]
        await asyncio.gather(*futures)
        assert all(f.done() and f.exception() is None for f in futures)
    finally:
        await ledger.close()
    assert len(store.threads) == 1 and loop_thread not in store.threads  # one long-lived thread
    assert callback_threads and set(callback_threads) == {loop_thread}
    assert len(callback_threads) == len(store.batches)
    assert store.real.count() == 75
    assert not mine[0].is_alive()


async def test_a_batch_wakes_the_loop_once(
    engine: Engine, tmp_path: Path, event: EventFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    store = ThreadRecordingStore(UsageStore(engine))
    commits = Commits()
    ledger = Ledger(store, Spool(tmp_path / "s.jsonl"), max_batch=50, on_commit=commits)  # type: ignore[arg-type]
    resolves: list[int] = []
    real = loop.call_soon_threadsafe

    def counting(callback, *args, **kw):  # type: ignore[no-untyped-def]
        if callback == ledger._resolve:
            resolves.append(len(args[0]))
        return real(callback, *args, **kw)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    await ledger.start()
    try:
        # appended in one loop iteration: handed to the writer together, committed in batches of 50
        await asyncio.gather(*(ledger.append(event()) for _ in range(200)))
    finally:
        await ledger.close()
    assert store.batches == [50, 50, 50, 50] == commits.batches == resolves


async def test_the_loop_runs_on_during_a_slow_commit(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    ledger = Ledger(
        ThreadRecordingStore(UsageStore(engine), delay_s=0.3),  # type: ignore[arg-type]
        Spool(tmp_path / "s.jsonl"),
    )
    await ledger.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        await ledger.append(event())
    finally:
        t.cancel()
        await ledger.close()
    assert ticks >= 10


async def test_close_flushes_events_queued_during_a_commit(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    store = ThreadRecordingStore(UsageStore(engine), delay_s=0.05)
    commits = Commits()
    ledger = Ledger(store, Spool(tmp_path / "s.jsonl"), max_batch=8, on_commit=commits)  # type: ignore[arg-type]
    early = [ledger.append_nowait(event()) for _ in range(3)]  # queued before start: committed after it
    await ledger.start()
    futures = list(early)
    for i in range(47):
        futures.append(ledger.append_nowait(event()))
        if i % 10 == 0:
            await asyncio.sleep(0.02)  # some arrive while a commit is running
    await ledger.close()  # returns once every queued event is committed
    assert all(f.done() and f.exception() is None for f in futures)
    assert store.real.count() == 50 and sum(commits.batches) == 50 and max(commits.batches) <= 8
    assert ledger._thread is None
    await ledger.close()  # closing twice is harmless


async def test_an_unexpected_error_reaches_the_waiters_and_the_writer_goes_on(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    store = ThreadRecordingStore(UsageStore(engine))
    ledger = Ledger(store, Spool(tmp_path / "s.jsonl"))  # type: ignore[arg-type]
    await ledger.start()
    try:
        store.fail_next = ValueError("a bug in the store")
        with pytest.raises(ValueError, match="a bug in the store"):
            await ledger.append(event())
        assert ledger.available  # not a database outage: nothing spooled
        assert not (tmp_path / "s.jsonl").exists()
        await ledger.append(event())
    finally:
        await ledger.close()
    assert store.real.count() == 1


async def test_a_failing_on_commit_callback_does_not_strand_the_waiters(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    def broken(_s: float, _n: int) -> None:
        raise RuntimeError("metrics are broken")

    store = UsageStore(engine)
    ledger = Ledger(store, Spool(tmp_path / "s.jsonl"), on_commit=broken)
    await ledger.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(ledger.append(event()) for _ in range(3))), 5)
    finally:
        await ledger.close()
    assert store.count() == 3


async def test_periodic_replay_runs_on_the_writer_thread(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    flaky = FlakyStore(UsageStore(engine))
    spool = Spool(tmp_path / "usage.jsonl")
    ledger = Ledger(flaky, spool, replay_interval_s=0.05)  # type: ignore[arg-type]
    await ledger.start()
    try:
        flaky.down = True
        await ledger.append(event())
        assert spool.pending() and not ledger.available
        flaky.down = False
        for _ in range(1000):  # no new request: the writer retries on its own
            if not spool.pending() and ledger.available:  # the writer marks it available after the replay
                break
            await asyncio.sleep(0.01)
        assert not spool.pending() and ledger.available and flaky.real.count() == 1
    finally:
        await ledger.close()


async def test_wal_checkpoints_at_full_stay_in_the_commit(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    """At synchronous=FULL (the default) SQLite checkpoints inside COMMITs as usual: no checkpointer."""
    ledger = Ledger(UsageStore(engine), Spool(tmp_path / "s.jsonl"), checkpoint_interval_s=0.02)
    await ledger.start()
    try:
        await ledger.append(event())
        assert ledger._checkpointer is None
    finally:
        await ledger.close()


async def test_wal_checkpoints_at_normal_run_off_the_commit_path(tmp_path: Path, event: EventFactory) -> None:
    """At synchronous=NORMAL the writer connection never checkpoints inside a COMMIT
    (wal_autocheckpoint=0); the ledger's own thread checkpoints instead, and stops with the ledger."""
    engine = make_engine(f"sqlite:///{tmp_path / 'normal.db'}", sqlite_synchronous="NORMAL")
    db_schema.upgrade(engine)
    store = UsageStore(engine)
    rounds: list[int] = []
    checkpoint = store.checkpoint

    def counted() -> None:
        rounds.append(1)
        checkpoint()

    store.checkpoint = counted  # type: ignore[method-assign]
    ledger = Ledger(store, Spool(tmp_path / "s.jsonl"), checkpoint_interval_s=0.02)
    await ledger.start()
    try:
        for i in range(50):
            await ledger.append(event(request_id=f"req-{i}"))
        sqlite = store._sqlite
        assert sqlite is not None
        with sqlite._lock:
            assert sqlite._conn is not None
            assert sqlite._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for _ in range(100):
            if len(rounds) >= 3:
                break
            await asyncio.sleep(0.02)
        assert len(rounds) >= 3
    finally:
        await ledger.close()
    stopped = len(rounds)
    await asyncio.sleep(0.1)
    assert len(rounds) == stopped  # the checkpointer ended with the ledger
    assert len(list(store.iter_events())) == 50
    engine.dispose()
