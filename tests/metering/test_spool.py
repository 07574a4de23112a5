"""The spool: one open file per outage (appended, sealed by size), replayed in order, each event read
once per replay, never stored twice, safe with writers and replayers running at once."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from metering.event_codec import codec
from metering.events import UsageEvent
from metering.spool import Spool
from metering.store_sql import UsageStore
from tests.metering.conftest import EventFactory


class CountingStore:
    """Counts the events handed to the store; `down` makes every append fail like a lost database."""

    def __init__(self, real: UsageStore) -> None:
        self.real = real
        self.down = False
        self.handed = 0

    def append_batch(self, events: Sequence[UsageEvent]) -> list[str]:
        self.handed += len(events)
        if self.down:
            raise OperationalError("INSERT INTO usage_events ...", {}, Exception("database is unreachable"))
        return self.real.append_batch(events)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _ids(store: UsageStore) -> list[str]:
    return [s.event.request_id for s in store.iter_events()]


def test_the_open_file_is_sealed_by_size_and_replayed_in_order(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    line = len(codec().to_json(event())) + 1
    spool = Spool(tmp_path / "usage.jsonl", max_bytes=10 * line, chunk=7)
    events = [event() for _ in range(95)]
    for e in events:
        spool.write([e])
    sealed = spool.sealed()
    assert len(sealed) >= 5 and spool.path.exists()  # full files and the open one
    assert all(p.stat().st_size >= spool.max_bytes for p in sealed)
    assert spool.path.stat().st_size < spool.max_bytes
    assert spool.read() == events
    store = CountingStore(UsageStore(engine))
    assert spool.replay(store) == 95
    assert _ids(store.real) == [e.request_id for e in events]
    assert store.handed <= 95 + 7  # each event once, and the open file's first chunk twice at most
    assert not spool.pending()
    assert spool.replay(store) == 0


def test_a_failed_replay_renames_nothing(engine: Engine, tmp_path: Path, event: EventFactory) -> None:
    spool = Spool(tmp_path / "spool" / "usage.jsonl")
    store = CountingStore(UsageStore(engine))
    store.down = True
    for _ in range(30):  # an outage: writes and replay attempts interleave
        spool.write([event()])
        with pytest.raises(OperationalError):
            spool.replay(store)
    assert _files(tmp_path / "spool") == ["usage.jsonl"]  # one file per outage
    store.down = False
    assert spool.replay(store) == 30
    assert _files(tmp_path / "spool") == []


def test_files_left_by_the_former_spool_are_replayed_first(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    spool = Spool(tmp_path / "usage.jsonl")
    old = [event() for _ in range(3)]
    (tmp_path / "usage.jsonl.replay-123-1700000000000000000").write_bytes(
        b"".join(codec().to_json(e) + b"\n" for e in old)
    )
    new = [event() for _ in range(2)]
    spool.write(new)
    store = UsageStore(engine)
    assert spool.replay(store) == 5
    assert _ids(store) == [e.request_id for e in old + new]
    assert not spool.pending()


def test_writers_and_replayers_at_once_store_every_event_exactly_once(
    engine: Engine, tmp_path: Path, event: EventFactory
) -> None:
    path = tmp_path / "usage.jsonl"
    store = UsageStore(engine)
    written: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def write(k: int) -> None:
        spool = Spool(path, max_bytes=4000)
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
    replayers = [threading.Thread(target=replay) for _ in range(2)]
    for t in [*replayers, *writers]:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    for t in replayers:
        t.join(60)
    Spool(path).replay(store)
    assert not Spool(path).pending()
    ids = _ids(store)
    assert sorted(ids) == sorted(written) and len(ids) == 120
    for k in range(3):  # each writer's events in the order it wrote them
        mine = [i for i in ids if i.startswith(f"req_w{k}_")]
        assert mine == [f"req_w{k}_{i}" for i in range(40)]


def test_an_open_file_without_a_whole_event_does_not_stay_pending(engine: Engine, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "usage.jsonl")
    spool.path.write_bytes(b'{"request_id": "torn')  # a write cut by a crash
    assert spool.replay(UsageStore(engine)) == 0
    assert not spool.pending()
