"""Fixtures for the metering tests: a migrated SQLite database per test and an event builder."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from serving import db_schema

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
_seq = itertools.count()

EventFactory = Callable[..., UsageEvent]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = make_engine(db_url)
    db_schema.upgrade(e)
    yield e
    e.dispose()


def make_event(request_id: str | None = None, **kw: Any) -> UsageEvent:
    n = next(_seq)
    started = kw.pop("started_at", T0 + timedelta(seconds=n))
    fields: dict[str, Any] = {
        "request_id": request_id or f"req_{n:08d}",
        "tenant_id": "acme",
        "key_id": "key_1",
        "model": "m",
        "origin_country": "DE",
        "prompt_tokens": 10 + n % 7,
        "cached_prompt_tokens": n % 3,
        "completion_tokens": 5 + n % 11,
        "stream": bool(n % 2),
        "outcome": Outcome.OK,
        "started_at": started,
        "finished_at": kw.pop("finished_at", started + timedelta(milliseconds=250)),
        "language": "en",
        "worker_id": "w0",
        "serving_region": "r1",
    }
    fields.update(kw)
    return UsageEvent(**fields)


@pytest.fixture
def event() -> EventFactory:
    return make_event
