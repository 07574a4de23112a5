"""RequestMeter and Recorder: one event per request, the worker's cumulative usage, metrics after commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from metering.events import Outcome, TokenType, UsageEvent
from metering.ledger import Ledger, Spool
from metering.metrics import Metrics
from metering.recorder import Recorder, RequestMeter
from metering.store_sql import UsageStore
from tests.conftest import metric


def _meter(rid: str = "req_1", **kw: object) -> RequestMeter:
    args: dict[str, object] = {
        "request_id": rid,
        "tenant_id": "acme",
        "key_id": "key_1",
        "model": "m",
        "endpoint": "chat.completions",
        "origin_country": "DE",
        "origin_source": "tenant",
        "stream": True,
        **kw,
    }
    return RequestMeter(**args)  # type: ignore[arg-type]


def test_take_usage_is_cumulative_and_keeps_cached_from_details() -> None:
    m = _meter()
    m.take_usage({"prompt_tokens": 31, "total_tokens": 31, "completion_tokens": 0})
    m.take_usage({"prompt_tokens": 31, "total_tokens": 33, "completion_tokens": 2})
    assert (m.prompt_tokens, m.cached_prompt_tokens, m.completion_tokens, m.has_usage) == (31, 0, 2, True)
    m.take_usage(
        {
            "prompt_tokens": 31,
            "total_tokens": 34,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 16},
        }
    )
    assert (m.prompt_tokens, m.cached_prompt_tokens, m.completion_tokens) == (31, 16, 3)
    m.take_usage({"prompt_tokens": 31, "completion_tokens": 3, "prompt_tokens_details": None})
    assert m.cached_prompt_tokens == 16
    m.take_usage({"prompt_tokens": None, "completion_tokens": None})
    assert (m.prompt_tokens, m.completion_tokens) == (0, 0)


def test_event_has_the_meter_facts_and_clamps_cached() -> None:
    m = _meter(language="tr", worker_id="w1", serving_region="r1")
    m.take_usage(
        {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 99}}
    )
    ev = m.event(Outcome.OK)
    assert ev.cached_prompt_tokens == 10  # never more cached than prompt: input is never negative
    assert ev.tokens_by_type() == {TokenType.INPUT: 0, TokenType.CACHED_INPUT: 10, TokenType.OUTPUT: 4}
    assert (ev.language, ev.worker_id, ev.serving_region, ev.stream) == ("tr", "w1", "r1", True)
    assert ev.started_at <= ev.finished_at
    assert ev.started_at.tzinfo is not None


@pytest.fixture
async def parts(
    engine: Engine, tmp_path: Path
) -> AsyncIterator[tuple[Recorder, UsageStore, Metrics, list[UsageEvent]]]:
    store = UsageStore(engine)
    ledger = Ledger(store, Spool(tmp_path / "s.jsonl"))
    metrics = Metrics({"m"})
    seen: list[UsageEvent] = []
    ledger.subscribe(seen.append)
    await ledger.start()
    yield Recorder(ledger, metrics), store, metrics, seen
    await ledger.close()


async def test_only_the_first_record_counts(
    parts: tuple[Recorder, UsageStore, Metrics, list[UsageEvent]],
) -> None:
    recorder, store, metrics, seen = parts
    m = _meter()
    m.take_usage({"prompt_tokens": 5, "completion_tokens": 2})
    ev = await recorder.record(m, Outcome.OK)
    assert ev is not None and m.recorded
    assert await recorder.record(m, Outcome.UPSTREAM_ERROR) is None
    recorder.record_nowait(m, Outcome.CLIENT_CANCELLED)
    got = store.get("req_1")
    assert got is not None and got.event.outcome is Outcome.OK
    assert store.count() == 1 and seen == [ev]
    assert metric(metrics.render().decode(), "tokenport_requests_total") == 1


async def test_record_nowait_moves_metrics_once_committed(
    parts: tuple[Recorder, UsageStore, Metrics, list[UsageEvent]],
) -> None:
    recorder, store, metrics, seen = parts
    m = _meter("req_cancel")
    m.take_usage({"prompt_tokens": 7, "completion_tokens": 3})
    recorder.record_nowait(m, Outcome.CLIENT_CANCELLED)
    assert m.recorded
    await recorder.ledger.close()  # flush
    stored = store.get("req_cancel")
    assert stored is not None and stored.event.outcome is Outcome.CLIENT_CANCELLED
    assert stored.event.completion_tokens == 3
    text = metrics.render().decode()
    assert metric(text, "tokenport_requests_total", outcome="client_cancelled") == 1
    assert metric(text, "tokenport_tokens_total", token_type="output") == 3
    assert [e.request_id for e in seen] == ["req_cancel"]


async def test_an_event_the_ledger_refused_is_reported_lost(tmp_path: Path) -> None:
    """Fail-closed and the database down: the caller gets LedgerUnavailable and the `refused`
    subscriber hears of the event (so budget holds can go); the `committed` one never does."""
    from sqlalchemy.exc import OperationalError

    from metering.ledger import LedgerUnavailable

    class Down:
        def append_batch(self, _events: Any) -> list[str]:
            raise OperationalError("INSERT ...", {}, Exception("database is unreachable"))

        def checkpoint_in_background(self) -> bool:
            return False

    ledger = Ledger(Down(), Spool(tmp_path / "s.jsonl"), fail_closed=True)  # type: ignore[arg-type]
    seen: list[UsageEvent] = []
    lost: list[UsageEvent] = []
    ledger.subscribe(seen.append, lost.append)
    recorder = Recorder(ledger, Metrics({"m"}))
    await ledger.start()
    try:
        with pytest.raises(LedgerUnavailable):
            await recorder.record(_meter("req_refused"), Outcome.OK)
        recorder.record_nowait(_meter("req_gone"), Outcome.CLIENT_CANCELLED)
        for _ in range(100):
            if len(lost) == 2:
                break
            await asyncio.sleep(0.01)
        assert [e.request_id for e in lost] == ["req_refused", "req_gone"] and seen == []
    finally:
        await ledger.close()
