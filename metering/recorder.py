"""Turns a finished request into one UsageEvent and appends it to the ledger.

What follows a durable event (metrics, budget settlement, spend) hears of it through the ledger's
subscriptions (`Ledger.subscribe`); the recorder subscribes the metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from metering.clock import utcnow
from metering.events import Outcome, UsageEvent
from metering.ledger import Ledger
from metering.metrics import Metrics

log = logging.getLogger("tokenport.recorder")


@dataclass(slots=True)
class RequestMeter:
    """What is known about a request while it runs; becomes a UsageEvent when it ends."""

    request_id: str
    tenant_id: str
    key_id: str
    model: str
    endpoint: str
    origin_country: str
    origin_source: str
    stream: bool
    language: str | None = None
    started_at: datetime = field(default_factory=utcnow)
    worker_id: str | None = None
    serving_region: str | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    has_usage: bool = False
    estimated: bool = False
    recorded: bool = False
    prompt_chars: int | None = None
    prompt_bytes: int | None = None
    completion_chars: int | None = None
    completion_bytes: int | None = None

    def measure_prompt(self, text: str) -> None:
        """The prompt's size (characters, UTF-8 bytes); the completion's starts at zero."""
        self.prompt_chars, self.prompt_bytes = text_size(text)
        self.completion_chars = self.completion_bytes = 0

    def add_completion(self, text: str) -> None:
        """Count generated text (a whole answer's, or one relayed delta)."""
        chars, size = text_size(text)
        self.completion_chars = (self.completion_chars or 0) + chars
        self.completion_bytes = (self.completion_bytes or 0) + size

    def take_usage(self, usage: dict[str, Any]) -> None:
        """Adopt the worker's usage object (cumulative on every streamed chunk)."""
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            self.cached_prompt_tokens = int(details.get("cached_tokens") or 0)
        self.has_usage = True

    def event(self, outcome: Outcome) -> UsageEvent:
        """The event: every field the meter shares with UsageEvent, and how and when the request ended."""
        values = {name: getattr(self, name) for name in _carried()}
        values["cached_prompt_tokens"] = min(self.cached_prompt_tokens, self.prompt_tokens)
        return UsageEvent(**values, outcome=outcome, finished_at=utcnow())


def text_size(text: str) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of `text`: no encoding for ASCII (CPython knows it without a scan)."""
    n = len(text)
    return (n, n) if text.isascii() else (n, len(text.encode("utf-8", "surrogatepass")))


@functools.cache
def _carried() -> tuple[str, ...]:
    """The UsageEvent fields a RequestMeter carries (all but `outcome` and `finished_at`, known at the
    end)."""
    mine = {f.name for f in fields(RequestMeter)}
    return tuple(f.name for f in fields(UsageEvent) if f.name in mine)


class Recorder:
    def __init__(self, ledger: Ledger, metrics: Metrics) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self._pending: set[asyncio.Future[None]] = set()
        ledger.subscribe(metrics.observe_event)

    async def record(self, meter: RequestMeter, outcome: Outcome) -> UsageEvent | None:
        """Append the request's event and wait until it is durable. Only the first call counts.
        Raises what the ledger raised (LedgerUnavailable when it fails closed)."""
        if meter.recorded:
            return None
        event, fut = self._append(meter, outcome, awaited=True)
        # Shielded: a client that goes away during the commit does not cancel the commit (the
        # subscribers, e.g. the budget settlement, hear of the event whatever the client does).
        await asyncio.shield(fut)
        return event

    def record_nowait(self, meter: RequestMeter, outcome: Outcome) -> None:
        """The same without awaiting: for requests abandoned by their client (under cancellation)."""
        if not meter.recorded:
            self._append(meter, outcome, awaited=False)

    def _append(
        self, meter: RequestMeter, outcome: Outcome, *, awaited: bool
    ) -> tuple[UsageEvent, asyncio.Future[None]]:
        meter.recorded = True
        event = meter.event(outcome)
        fut = self.ledger.append_nowait(event)
        self._pending.add(fut)

        def done(f: asyncio.Future[None]) -> None:
            self._pending.discard(f)
            if not awaited and not f.cancelled() and f.exception() is not None:
                log.error("could not record %s: %s", event.request_id, f.exception())

        fut.add_done_callback(done)
        return event, fut
