"""Reconciliation: the ledger's token totals against the workers' own counters.

A vLLM worker counts every token it processes (``vllm:prompt_tokens_total``,
``vllm:prompt_tokens_cached_total``, ``vllm:generation_tokens_total``, by ``model_name``) from the
moment its process created those counters (``vllm:prompt_tokens_created``, else
``process_start_time_seconds``): the *counter epoch*. Counters are cumulative and restart at zero
with a new process, so a comparison needs a baseline on both sides:

- **since the worker started** (the default): worker counters minus zero, against the ledger's
  events of that worker and model that *started* at or after the epoch. Stateless and exact.
- **since a snapshot** (``--since T``): each run stores a snapshot per worker and model (counters,
  counter epoch and the ledger's ``seq`` at that moment, table ``metering_snapshots``). The latest
  snapshot of the same worker process taken at or before T is the baseline: worker delta =
  counters now - counters then, ledger delta = events with ``seq`` in (snapshot seq, seq now].
  When T is before the worker's epoch, the worker's start is the baseline; when no snapshot of
  this worker process was taken at or before T, the worker's start is used and the report says so.

The ledger position is read before the counters are scraped, so a request still in flight can only
make the worker side larger (its tokens are counted before its event is committed): at a quiet
moment drift is exactly zero, under load it is bounded by the tokens in flight.

Drift per token type (``input`` = prompt - cached, ``cached_input``, ``output``) is
``ledger - worker``: negative means tokens served but not metered. Requests cut off by their client
or by a worker failure are billed what the worker had reported when they were cut off; the worker
may have generated a few more tokens before the abort reached it, so each cut-off event is allowed
``cutoff_slack`` tokens of negative output drift (see README, Metering).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from metering.store_sql import UsageStore, WorkerTotals

log = logging.getLogger("tokenport.reconcile")
TOKEN_TYPES = ("input", "cached_input", "output")
PROMPT = "vllm:prompt_tokens"
CACHED = "vllm:prompt_tokens_cached"
GENERATION = "vllm:generation_tokens"


@dataclass(frozen=True, slots=True)
class Target:
    worker_id: str
    model: str
    url: str


@dataclass(frozen=True, slots=True)
class Counters:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0

    def minus(self, other: Counters) -> Counters:
        return Counters(
            self.prompt_tokens - other.prompt_tokens,
            self.cached_prompt_tokens - other.cached_prompt_tokens,
            self.completion_tokens - other.completion_tokens,
        )

    def by_type(self) -> dict[str, int]:
        return {
            "input": self.prompt_tokens - self.cached_prompt_tokens,
            "cached_input": self.cached_prompt_tokens,
            "output": self.completion_tokens,
        }


@dataclass(frozen=True, slots=True)
class Reading:
    target: Target
    taken_at: datetime
    epoch: float  # unix seconds: when the worker process created its counters
    counters: Counters


class ScrapeError(Exception):
    pass


def parse_worker_metrics(text: str, model: str) -> tuple[Counters, float]:
    """(counters of `model` summed over engines, counter epoch) from a vLLM /metrics page."""
    sums = {PROMPT: 0.0, CACHED: 0.0, GENERATION: 0.0}
    seen: set[str] = set()
    created: list[float] = []
    process_start: float | None = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "process_start_time_seconds":
                process_start = s.value
                continue
            if s.labels.get("model_name") != model:
                continue
            base = s.name.removesuffix("_total").removesuffix("_created")
            if base not in sums:
                continue
            if s.name.endswith("_created"):
                created.append(s.value)
            elif s.name.endswith("_total") or s.name == base:
                sums[base] += s.value
                seen.add(base)
    if PROMPT not in seen or GENERATION not in seen:
        raise ScrapeError(f"no vllm:prompt_tokens / vllm:generation_tokens for model_name={model!r}")
    epoch = min(created) if created else process_start
    if epoch is None:
        raise ScrapeError(
            "the worker exposes neither vllm:prompt_tokens_created nor process_start_time_seconds"
        )
    return Counters(int(sums[PROMPT]), int(sums[CACHED]), int(sums[GENERATION])), float(epoch)


async def scrape(session: aiohttp.ClientSession, target: Target, timeout_s: float = 5.0) -> Reading:
    try:
        async with session.get(
            target.url.rstrip("/") + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                raise ScrapeError(f"{target.url}/metrics answered HTTP {resp.status}")
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ScrapeError(f"{target.url}/metrics: {type(exc).__name__}: {exc}") from exc
    counters, epoch = parse_worker_metrics(text, target.model)
    return Reading(target, datetime.now(UTC), epoch, counters)


async def scrape_all(
    targets: Sequence[Target], session: aiohttp.ClientSession | None = None
) -> list[Reading | ScrapeError]:
    own = session is None
    s = session or aiohttp.ClientSession()
    try:
        results = await asyncio.gather(*(scrape(s, t) for t in targets), return_exceptions=True)
    finally:
        if own:
            await s.close()
    out: list[Reading | ScrapeError] = []
    for r in results:
        if isinstance(r, Reading | ScrapeError):
            out.append(r)
        else:
            out.append(ScrapeError(f"{type(r).__name__}: {r}"))
    return out


@dataclass(frozen=True, slots=True)
class DriftRow:
    worker: str
    model: str
    token_type: str
    ledger: int
    worker_tokens: int
    cut_off: int
    allowed: float

    @property
    def drift(self) -> int:
        return self.ledger - self.worker_tokens

    @property
    def ratio(self) -> float:
        if self.worker_tokens:
            return self.drift / self.worker_tokens
        return 0.0 if self.drift == 0 else (1.0 if self.drift > 0 else -1.0)

    @property
    def ok(self) -> bool:
        return abs(self.drift) <= self.allowed

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "model": self.model,
            "token_type": self.token_type,
            "ledger": self.ledger,
            "worker_tokens": self.worker_tokens,
            "drift": self.drift,
            "ratio": self.ratio,
            "cut_off_events": self.cut_off,
            "allowed": self.allowed,
            "ok": self.ok,
        }


@dataclass
class Report:
    rows: list[DriftRow] = field(default_factory=list)
    baselines: dict[tuple[str, str], str] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    ledger_seq: int = 0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok and not self.unreachable,
            "ledger_seq": self.ledger_seq,
            "rows": [r.as_dict() for r in self.rows],
            "baselines": [{"worker": w, "model": m, "baseline": b} for (w, m), b in self.baselines.items()],
            "unreachable": self.unreachable,
        }


@dataclass(frozen=True, slots=True)
class Tolerance:
    """|drift| allowed per row: max(tokens, ratio x worker tokens), plus cut-off slack on output
    tokens the worker generated but the ledger does not have (negative output drift only)."""

    tokens: int = 0
    ratio: float = 0.0
    cutoff_slack: int = 16

    def allowed(self, token_type: str, worker_tokens: int, drift: int, cut_off: int) -> float:
        base = max(float(self.tokens), self.ratio * worker_tokens)
        if token_type == "output" and drift < 0:
            base += self.cutoff_slack * cut_off
        return base


def compare(
    reading: Reading, totals: WorkerTotals, baseline: Counters, tolerance: Tolerance
) -> list[DriftRow]:
    ledger = Counters(totals.prompt_tokens, totals.cached_prompt_tokens, totals.completion_tokens).by_type()
    worker = reading.counters.minus(baseline).by_type()
    rows = []
    for tt in TOKEN_TYPES:
        drift = ledger[tt] - worker[tt]
        rows.append(
            DriftRow(
                reading.target.worker_id,
                reading.target.model,
                tt,
                ledger[tt],
                worker[tt],
                totals.cut_off,
                tolerance.allowed(tt, worker[tt], drift, totals.cut_off),
            )
        )
    return rows


def epoch_time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def reconcile(
    store: UsageStore,
    readings: Iterable[Reading],
    *,
    upto_seq: int,
    since: datetime | None = None,
    tolerance: Tolerance = Tolerance(),
) -> Report:
    """Compare each reading with the ledger (see the module docstring for the baselines)."""
    report = Report(ledger_seq=upto_seq)
    for r in readings:
        key = (r.target.worker_id, r.target.model)
        start = epoch_time(r.epoch)
        baseline, after_seq = Counters(), 0
        label = f"worker start {start.isoformat(timespec='seconds')}"
        if since is not None and since > start:
            snap = store.snapshot_before(r.target.worker_id, r.target.model, since, r.epoch)
            if snap is not None:
                baseline = Counters(snap.prompt_tokens, snap.cached_prompt_tokens, snap.completion_tokens)
                after_seq = snap.ledger_seq
                label = f"snapshot {snap.taken_at.isoformat(timespec='seconds')} (seq {after_seq})"
            else:
                at = since.isoformat(timespec="seconds")
                label += f" (no snapshot of this worker process at or before {at})"
        totals = store.worker_totals(
            r.target.worker_id, r.target.model, after_seq=after_seq, upto_seq=upto_seq, started_from=start
        )
        report.baselines[key] = label
        report.rows.extend(compare(r, totals, baseline, tolerance))
    return report


def snapshot_rows(readings: Iterable[Reading], upto_seq: int) -> list[dict[str, object]]:
    return [
        {
            "taken_at": r.taken_at,
            "worker_id": r.target.worker_id,
            "model": r.target.model,
            "counters_epoch": r.epoch,
            "prompt_tokens": r.counters.prompt_tokens,
            "cached_prompt_tokens": r.counters.cached_prompt_tokens,
            "completion_tokens": r.counters.completion_tokens,
            "ledger_seq": upto_seq,
        }
        for r in readings
    ]


async def run(
    store: UsageStore,
    targets: Sequence[Target],
    *,
    since: datetime | None = None,
    tolerance: Tolerance = Tolerance(),
    save_snapshot: bool = True,
    session: aiohttp.ClientSession | None = None,
) -> Report:
    """One reconciliation: ledger position, then the workers' counters, then the comparison."""
    upto = await asyncio.to_thread(store.max_seq)
    results = await scrape_all(targets, session)
    readings = [r for r in results if isinstance(r, Reading)]
    report = await asyncio.to_thread(
        reconcile, store, readings, upto_seq=upto, since=since, tolerance=tolerance
    )
    for t, r in zip(targets, results, strict=True):
        if isinstance(r, ScrapeError):
            report.unreachable[t.worker_id] = str(r)
    if save_snapshot and readings:
        await asyncio.to_thread(store.save_snapshots, snapshot_rows(readings, upto))
    return report


class PeriodicReconciler:
    """Runs inside the gateway: every `interval_s`, reconciles each worker since its start and sets
    `tokenport_metering_drift_tokens` / `tokenport_metering_drift_ratio` (what alerting watches)."""

    def __init__(
        self,
        store: UsageStore,
        targets: Callable[[], Sequence[Target]],
        set_drift: Callable[[DriftRow], None],
        interval_s: float,
        session: Callable[[], aiohttp.ClientSession | None],
    ) -> None:
        self.store = store
        self.targets = targets
        self.set_drift = set_drift
        self.interval_s = interval_s
        self.session = session
        self.tolerance = Tolerance()
        self.last: Report | None = None
        self._acc: dict[tuple[str, str], tuple[float | None, int, WorkerTotals]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="metering-reconcile")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def once(self) -> Report:
        """Since each worker's start, incrementally: only events above the last round's seq are read."""
        targets = list(self.targets())
        upto = await asyncio.to_thread(self.store.max_seq)
        results = await scrape_all(targets, self.session())
        report = Report(ledger_seq=upto)
        for t, r in zip(targets, results, strict=True):
            if isinstance(r, ScrapeError):
                report.unreachable[t.worker_id] = str(r)
                continue
            key = (t.worker_id, t.model)
            epoch, last_seq, acc = self._acc.get(key, (None, 0, WorkerTotals(0, 0, 0, 0, 0, 0)))
            if epoch != r.epoch:  # first round, or the worker restarted: start over from its epoch
                last_seq, acc = 0, WorkerTotals(0, 0, 0, 0, 0, 0)
            new = await asyncio.to_thread(
                self.store.worker_totals,
                t.worker_id,
                t.model,
                after_seq=last_seq,
                upto_seq=upto,
                started_from=epoch_time(r.epoch),
            )
            acc = WorkerTotals(*(a + b for a, b in zip(astuple(acc), astuple(new), strict=True)))
            self._acc[key] = (r.epoch, max(last_seq, upto), acc)
            report.baselines[key] = f"worker start {epoch_time(r.epoch).isoformat(timespec='seconds')}"
            report.rows.extend(compare(r, acc, Counters(), self.tolerance))
        for row in report.rows:
            self.set_drift(row)
        self.last = report
        return report

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.once()
            except Exception:
                log.exception("periodic reconcile failed")
