"""Degradation that stays fast: a ledger database that is locked or down costs a request at most
`metering.spool_after_s` once, then nothing (the events join the spool at once); an outage leaves
one spool file, not one per commit, and is replayed in order without re-reading it per commit."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from metering.events import UsageEvent
from metering.ledger import Ledger
from metering.spool import Spool
from metering.store_sql import UsageStore
from tests.metering.conftest import EventFactory


async def test_a_locked_sqlite_ledger_spools_after_the_bounded_wait(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    store = UsageStore(engine, append_wait_s=0.5)
    attempts: list[int] = []
    append_batch = store.append_batch

    def counted(events: Sequence[UsageEvent]) -> list[str]:
        attempts.append(len(events))
        return append_batch(events)

    store.append_batch = counted  # type: ignore[method-assign]
    spool = Spool(tmp_path / "spool" / "usage.jsonl")
    ledger = Ledger(store, spool, replay_interval_s=30)
    await ledger.start()
    locker = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    first, second, third = event(), event(), event()
    try:
        locker.execute(
            "BEGIN IMMEDIATE"
        )  # another process holds the write lock (a stuck writer, a backup...)
        t0 = time.monotonic()
        await asyncio.wait_for(ledger.append(first), 10)
        assert 0.4 < time.monotonic() - t0 < 5  # the bounded wait, not SQLite's 30 s busy timeout
        assert attempts == [1]
        await ledger.append(second)
        assert attempts == [1]  # spooled at once: the locked database is not asked again
        assert [e.request_id for e in spool.read()] == [first.request_id, second.request_id]
        locker.execute("ROLLBACK")
        await ledger.append(third)  # still spooled, behind the others, until the next replay
    finally:
        locker.close()
        await ledger.close()  # replays the spool: the database answers again
    assert [s.event.request_id for s in store.iter_events()] == [e.request_id for e in (first, second, third)]
    assert not spool.pending()


class DownStore:
    """A store whose database is down until `down` is False; counts the events handed to it."""

    def __init__(self, real: UsageStore) -> None:
        self.real = real
        self.down = True
        self.handed = 0

    def append_batch(self, events: Sequence[UsageEvent]) -> list[str]:
        self.handed += len(events)
        if self.down:
            raise OperationalError("INSERT INTO usage_events ...", {}, Exception("database is unreachable"))
        return self.real.append_batch(events)

    def checkpoint_in_background(self) -> bool:
        return False


async def test_an_outage_leaves_one_spool_file_and_replays_in_order(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    store = DownStore(UsageStore(engine))
    folder = tmp_path / "spool"
    interval = 0.2
    ledger = Ledger(store, Spool(folder / "usage.jsonl"), replay_interval_s=interval)  # type: ignore[arg-type]
    await ledger.start()
    try:
        events = [event() for _ in range(60)]
        t0 = time.monotonic()
        for e in events:  # one commit each: one commit attempt each
            await ledger.append(e)
        outage = time.monotonic() - t0
        files = [p.name for p in folder.iterdir()]
        assert files == ["usage.jsonl"]  # one file per outage, not one per commit attempt
        attempts = 2 + outage / interval  # the first commit, then one replay per interval at most
        assert store.handed <= attempts * len(events)
        assert store.handed < len(events) * len(events) / 4  # not a re-read of the spool per commit
        store.down = False
        await asyncio.sleep(interval * 1.5)
        last = event()
        await ledger.append(last)
        ids = [s.event.request_id for s in store.real.iter_events()]
        assert ids == [e.request_id for e in [*events, last]]  # in order, each once
        assert not any(folder.iterdir())  # nothing left behind
    finally:
        await ledger.close()
