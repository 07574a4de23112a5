"""UsageStore: idempotent appends (also across threads and engines) and a verifiable hash chain."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from metering.chain import GENESIS, canonical, chain_hash
from metering.db import make_engine
from metering.events import Outcome
from metering.store_sql import UsageStore
from tests.metering.conftest import EventFactory


def verify_chain(store: UsageStore) -> int | None:
    """Recompute the chain from GENESIS over the stored rows; the seq of the first bad row, or None."""
    prev = GENESIS
    for stored in store.iter_events():
        if stored.prev_hash != prev or chain_hash(prev, stored.event) != stored.hash:
            return stored.seq
        prev = stored.hash
    return None


def test_append_stores_every_field(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    e = event(
        origin_source="header", endpoint="completions", estimated=True, outcome=Outcome.CLIENT_CANCELLED
    )
    assert store.append_batch([e]) == [e.request_id]
    got = store.get(e.request_id)
    assert got is not None
    assert got.event == e
    assert got.seq == 1 and got.prev_hash == GENESIS and got.hash == chain_hash(GENESIS, e)
    assert got.recorded_at.tzinfo is not None and got.recorded_at >= e.finished_at - timedelta(days=3650)
    assert store.get("missing") is None


def test_same_request_id_is_stored_once(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    a = event("req_same")
    assert store.append_batch([a]) == ["req_same"]
    # A retry with different content (e.g. a second recording) never overwrites the fact.
    again = event("req_same", completion_tokens=999)
    assert store.append_batch([again]) == []
    assert store.append_batch([event("req_other"), event("req_same"), event("req_other")]) == ["req_other"]
    assert store.count() == 2
    got = store.get("req_same")
    assert got is not None and got.event.completion_tokens == a.completion_tokens
    assert store.append_batch([]) == []
    assert verify_chain(store) is None


@pytest.mark.parametrize("separate_engines", [False, True])
def test_concurrent_appends_of_one_id_store_it_once(
    db_url: str, engine: Engine, event: EventFactory, separate_engines: bool
) -> None:
    shared = UsageStore(engine)
    n_threads = 8
    barrier = threading.Barrier(n_threads)
    results: list[list[str]] = []
    errors: list[BaseException] = []
    engines: list[Engine] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            if separate_engines:  # like separate gateway processes sharing one ledger
                eng = make_engine(db_url)
                with lock:
                    engines.append(eng)
                store = UsageStore(eng)
            else:
                store = shared
            batch = [event("req_contended", completion_tokens=i), event(f"req_own_{i}")]
            barrier.wait()
            got = store.append_batch(batch)
            with lock:
                results.append(got)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for eng in engines:
        eng.dispose()
    assert errors == []
    stored_now = [rid for r in results for rid in r]
    assert stored_now.count("req_contended") == 1
    assert sorted(r for r in stored_now if r != "req_contended") == sorted(
        f"req_own_{i}" for i in range(n_threads)
    )
    assert shared.count() == n_threads + 1
    assert verify_chain(shared) is None
    seqs = [s.seq for s in shared.iter_events()]
    assert seqs == list(range(1, n_threads + 2))


def test_hash_chain_recomputes_from_genesis(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    events = [event() for _ in range(25)]
    store.append_batch(events[:10])
    store.append_batch(events[10:11])
    store.append_batch(events[11:])
    stored = list(store.iter_events())
    assert [s.event.request_id for s in stored] == [e.request_id for e in events]
    prev = GENESIS
    for s, e in zip(stored, events, strict=True):
        assert s.prev_hash == prev
        assert s.hash == chain_hash(prev, e)  # the hash covers the event as appended ...
        assert s.hash == chain_hash(prev, s.event)  # ... and as read back
        prev = s.hash
    assert verify_chain(store) is None


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("completion_tokens", 999_999),
        ("prompt_tokens", 0),
        ("cached_prompt_tokens", 1),
        ("origin_country", "'US'"),
        ("tenant_id", "'someone-else'"),
        ("outcome", "'rejected'"),
    ],
)
def test_editing_a_row_breaks_the_chain(
    engine: Engine, event: EventFactory, column: str, value: object
) -> None:
    store = UsageStore(engine)
    store.append_batch([event(cached_prompt_tokens=0) for _ in range(5)])
    assert verify_chain(store) is None
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE usage_events SET {column} = {value} WHERE seq = 3"))
    assert verify_chain(store) == 3


def test_deleting_a_row_breaks_the_chain(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    store.append_batch([event() for _ in range(5)])
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM usage_events WHERE seq = 2"))
    assert verify_chain(store) == 3


def test_rewriting_a_row_and_its_hash_is_caught_by_the_next_row(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    store.append_batch([event() for _ in range(4)])
    row2 = store.get(list(store.iter_events())[1].event.request_id)
    assert row2 is not None
    forged = chain_hash(
        row2.prev_hash,
        row2.event.__class__(
            **{**{f: getattr(row2.event, f) for f in row2.event.__dataclass_fields__}, "completion_tokens": 1}
        ),
    )
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE usage_events SET completion_tokens = 1, hash = :h WHERE seq = 2"), {"h": forged}
        )
    assert verify_chain(store) == 3


def test_canonical_covers_every_fact_field(event: EventFactory) -> None:
    base = event("req_x")
    changed = {
        "tenant_id": "t2",
        "key_id": "k2",
        "model": "m2",
        "endpoint": "completions",
        "origin_country": "FR",
        "origin_source": "header",
        "language": "ar",
        "serving_region": "r9",
        "worker_id": "w9",
        "prompt_tokens": 1234,
        "cached_prompt_tokens": 0 if base.cached_prompt_tokens else 1,
        "completion_tokens": 4321,
        "stream": not base.stream,
        "outcome": Outcome.REJECTED,
        "estimated": True,
        "started_at": base.started_at - timedelta(seconds=1),
        "finished_at": base.finished_at + timedelta(microseconds=1),
    }
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    for name, value in changed.items():
        other = base.__class__(**{**fields, name: value})
        assert canonical(other) != canonical(base), name


def test_chain_verifies_for_aware_non_utc_timestamps(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    beijing = timezone(timedelta(hours=8))
    started = datetime(2026, 3, 1, 20, 0, 0, tzinfo=beijing)  # == 12:00 UTC
    e = event(started_at=started, finished_at=started + timedelta(seconds=1))
    store.append_batch([e])
    got = store.get(e.request_id)
    assert got is not None
    assert got.event.started_at == datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)  # the same instant
    assert verify_chain(store) is None


def test_iter_events_filters_and_pages(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    t = datetime(2026, 1, 1, tzinfo=UTC)
    evs = [event(tenant_id="a" if i % 2 else "b", started_at=t + timedelta(days=i)) for i in range(10)]
    store.append_batch(evs)
    assert [s.event.request_id for s in store.iter_events(batch=3)] == [e.request_id for e in evs]
    assert [s.event.tenant_id for s in store.iter_events(tenant_id="a")] == ["a"] * 5
    window = list(store.iter_events(start=t + timedelta(days=2), end=t + timedelta(days=5)))
    assert [s.event.request_id for s in window] == [e.request_id for e in evs[2:5]]
    assert len(list(store.iter_events(limit=4, batch=3))) == 4
    assert [s.seq for s in store.iter_events(after_seq=8)] == [9, 10]


def test_summary_groups_and_rejects_unknown_fields(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    store.append_batch(
        [
            event(
                tenant_id="a",
                origin_country="DE",
                prompt_tokens=10,
                cached_prompt_tokens=2,
                completion_tokens=3,
            ),
            event(
                tenant_id="a",
                origin_country="FR",
                prompt_tokens=5,
                cached_prompt_tokens=0,
                completion_tokens=1,
            ),
            event(
                tenant_id="b",
                origin_country="DE",
                prompt_tokens=7,
                cached_prompt_tokens=7,
                completion_tokens=2,
            ),
        ]
    )
    rows = store.summary(["tenant_id", "origin_country"])
    assert rows == [
        {
            "tenant_id": "a",
            "origin_country": "DE",
            "requests": 1,
            "prompt_tokens": 10,
            "cached_prompt_tokens": 2,
            "completion_tokens": 3,
        },
        {
            "tenant_id": "a",
            "origin_country": "FR",
            "requests": 1,
            "prompt_tokens": 5,
            "cached_prompt_tokens": 0,
            "completion_tokens": 1,
        },
        {
            "tenant_id": "b",
            "origin_country": "DE",
            "requests": 1,
            "prompt_tokens": 7,
            "cached_prompt_tokens": 7,
            "completion_tokens": 2,
        },
    ]
    assert store.summary([], tenant_id="a") == [
        {"requests": 2, "prompt_tokens": 15, "cached_prompt_tokens": 2, "completion_tokens": 4}
    ]
    with pytest.raises(ValueError, match="cannot group by"):
        store.summary(["prompt_tokens; DROP TABLE usage_events"])
