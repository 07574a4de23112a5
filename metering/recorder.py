"""Turns a finished request into one UsageEvent, appends it to the ledger, then moves the metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from metering.events import Outcome, UsageEvent
from metering.ledger import Ledger
from metering.metrics import Metrics
from metering.tenants import utcnow

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

    def take_usage(self, usage: dict[str, Any]) -> None:
        """Adopt the worker's usage object (cumulative on every streamed chunk)."""
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            self.cached_prompt_tokens = int(details.get("cached_tokens") or 0)
        self.has_usage = True

    def event(self, outcome: Outcome) -> UsageEvent:
        return UsageEvent(
            request_id=self.request_id, tenant_id=self.tenant_id, key_id=self.key_id, model=self.model,
            origin_country=self.origin_country, prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=min(self.cached_prompt_tokens, self.prompt_tokens),
            completion_tokens=self.completion_tokens, stream=self.stream, outcome=outcome,
            started_at=self.started_at, finished_at=utcnow(), endpoint=self.endpoint,
            origin_source=self.origin_source, language=self.language, serving_region=self.serving_region,
            worker_id=self.worker_id, estimated=self.estimated,
        )


class Recorder:
    def __init__(self, ledger: Ledger, metrics: Metrics,
                 on_event: Callable[[UsageEvent], None] | None = None,
                 on_lost: Callable[[UsageEvent], None] | None = None) -> None:
        """`on_event`: the event is in the ledger. `on_lost`: the ledger refused it (fail-closed, or
        the spool could not be written either): nothing of the request was billed."""
        self.ledger = ledger
        self.metrics = metrics
        self._on_event = on_event
        self._on_lost = on_lost
        self._pending: set[asyncio.Future[None]] = set()

    async def record(self, meter: RequestMeter, outcome: Outcome) -> UsageEvent | None:
        """Append the request's event and wait until it is durable. Only the first call counts.
        Raises what the ledger raised (LedgerUnavailable when it fails closed)."""
        if meter.recorded:
            return None
        event, fut = self._append(meter, outcome, awaited=True)
        # Shielded: a client that goes away during the commit neither cancels the commit nor skips
        # the metrics and the budget settlement that follow it (they run in the future's callback).
        await asyncio.shield(fut)
        return event

    def record_nowait(self, meter: RequestMeter, outcome: Outcome) -> None:
        """The same without awaiting: for requests abandoned by their client (under cancellation)."""
        if not meter.recorded:
            self._append(meter, outcome, awaited=False)

    def _append(self, meter: RequestMeter, outcome: Outcome, *, awaited: bool) -> tuple[UsageEvent, asyncio.Future[None]]:
        meter.recorded = True
        event = meter.event(outcome)
        fut = self.ledger.append_nowait(event)
        self._pending.add(fut)

        def done(f: asyncio.Future[None]) -> None:
            self._pending.discard(f)
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                self._after(event)
                return
            if not awaited:  # an awaiting caller gets the exception instead
                log.error("could not record %s: %s", event.request_id, exc)
            if self._on_lost is not None:
                self._on_lost(event)

        fut.add_done_callback(done)
        return event, fut

    def _after(self, event: UsageEvent) -> None:
        self.metrics.observe_event(event)
        if self._on_event is not None:
            self._on_event(event)
