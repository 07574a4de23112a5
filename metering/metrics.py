"""Prometheus metrics with bounded labels.

Label values come only from closed sets: configured models (anything else is `__unknown__`),
ISO country codes, ISO 639-1 languages, fixed outcomes and token types, and tenants up to a cap
(`gateway.max_tenant_labels`); tenants past the cap share the value `__other__` and every overflow
is counted. Per-tenant detail beyond the cap lives in the ledger, never in Prometheus.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from metering.events import TOKEN_TYPES, Outcome, UsageEvent

OTHER = "__other__"
UNKNOWN = "__unknown__"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class BoundedLabel:
    """Admits at most `cap` distinct values; the rest map to OTHER (and are counted)."""

    def __init__(self, name: str, cap: int, overflow: Counter, values: Gauge, cap_gauge: Gauge) -> None:
        self.name = name
        self.cap = cap
        self._seen: set[str] = set()
        self._overflow = overflow.labels(label=name)
        self._values = values.labels(label=name)
        cap_gauge.labels(label=name).set(cap)

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.cap:
            self._seen.add(value)
            self._values.set(len(self._seen))
            return value
        self._overflow.inc()
        return OTHER


class Metrics:
    def __init__(
        self, models: Iterable[str], *, max_tenants: int = 200, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.models = frozenset(models)
        self.tokens = Counter(
            "tokenport_tokens",
            "Tokens metered, by tenant, origin country, model, "
            "token type (input excludes cached) and language.",
            ["tenant", "origin_country", "model", "token_type", "language"],
            registry=r,
        )
        self.characters = Counter(
            "tokenport_characters",
            "Characters of text metered (prompt, completion), by model "
            "and language (metering.languages + und): with tokenport_tokens_total, the "
            "token premium by language.",
            ["model", "language", "part"],
            registry=r,
        )
        self.requests = Counter(
            "tokenport_requests", "Requests metered, by outcome.", ["tenant", "model", "outcome"], registry=r
        )
        self.responses = Counter(
            "tokenport_http_responses",
            "HTTP responses by route template and status.",
            ["route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "tokenport_request_duration_seconds",
            "Whole request duration.",
            ["model", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tokenport_time_to_first_token_seconds",
            "Time to the first streamed token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "tokenport_upstream_duration_seconds",
            "Time waiting on the worker.",
            ["model", "worker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "tokenport_gateway_overhead_seconds",
            "Time spent in the gateway itself, excluding upstream time.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.commit = Histogram(
            "tokenport_ledger_commit_seconds",
            "Ledger group-commit duration.",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.commit_batch = Histogram(
            "tokenport_ledger_commit_batch_events",
            "Events per ledger commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.inflight = Gauge("tokenport_inflight_requests", "Requests in flight.", ["model"], registry=r)
        self.worker_ejections = Counter(
            "tokenport_worker_ejections_total",
            "Times the worker was ejected after failed requests in a row (outlier ejection).",
            ["worker", "model"],
            registry=r,
        )
        self.worker_healthy = Gauge(
            "tokenport_worker_healthy",
            "1 if the worker passed its last health check.",
            ["worker", "model"],
            registry=r,
        )
        self.workers = Gauge(
            "tokenport_workers",
            "Workers in the set by state: active (may take requests once healthy), draining (left the "
            "set, finishing its requests in flight).",
            ["model", "state"],
            registry=r,
        )
        self.discovery_errors = Counter(
            "tokenport_worker_discovery_errors",
            "Refused workers-file edits and failed lookups (the last good set stays).",
            ["source"],
            registry=r,
        )
        self.estimated_spend = Counter(
            "tokenport_estimated_spend",
            "ESTIMATED spend in major currency units, priced at request time. "
            "Invoices come from the ledger, never from this.",
            ["tenant", "currency", "origin_country"],
            registry=r,
        )
        self.usage_estimated = Counter(
            "tokenport_usage_estimated",
            "Requests whose usage the worker did not report, counted by the gateway's tokenizer.",
            ["model"],
            registry=r,
        )
        self.drift_ratio = Gauge(
            "tokenport_metering_drift_ratio",
            "Ledger vs worker counter drift (ratio).",
            ["worker", "model", "token_type"],
            registry=r,
        )
        self.drift_tokens = Gauge(
            "tokenport_metering_drift_tokens",
            "Ledger vs worker counter drift (tokens).",
            ["worker", "model", "token_type"],
            registry=r,
        )
        self.budget_used = Gauge(
            "tokenport_budget_used_ratio", "Share of the tenant's budget used.", ["tenant"], registry=r
        )
        label_values = Gauge(
            "tokenport_label_values", "Distinct values tracked for a capped label.", ["label"], registry=r
        )
        label_cap = Gauge("tokenport_label_cap", "Cap on distinct values of a label.", ["label"], registry=r)
        overflow = Counter(
            "tokenport_label_overflow",
            "Label values folded into __other__ past the cap.",
            ["label"],
            registry=r,
        )
        self.tenant_label = BoundedLabel("tenant", max_tenants, overflow, label_values, label_cap)
        # Start counters at zero for every known model, so increase() sees the first event.
        for m in self.models:
            self.usage_estimated.labels(model=m)
            self.inflight.labels(model=m)

    def child(self, metric: Any, *values: str) -> Any:
        """metric.labels(*values), cached: labels() validates and locks on every call, a dict does not.
        Bounded like the label values themselves."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def forget_worker(self, worker: Any) -> None:
        """Drop a departed, drained worker's series, so workers that come and go do not pile them up."""
        wid, model = worker.id, worker.model
        removals: list[tuple[Any, tuple[str, ...]]] = [
            (self.worker_healthy, (wid, model)),
            (self.worker_ejections, (wid, model)),
            (self.upstream, (self.model_label(model), wid)),
        ]
        for gauge in (self.drift_tokens, self.drift_ratio):
            removals += [(gauge, (wid, model, t.value)) for t in TOKEN_TYPES]
        for metric, values in removals:
            self._children.pop((id(metric), values), None)
            with contextlib.suppress(KeyError):
                metric.remove(*values)

    def count_workers(self, models: Iterable[str], workers: Iterable[Any]) -> None:
        """tokenport_workers{model,state}: active and draining workers per model."""
        listed = list(workers)
        for m in models:
            for state, draining in (("active", False), ("draining", True)):
                n = sum(1 for w in listed if w.model == m and w.draining == draining)
                self.workers.labels(m, state).set(n)

    def model_label(self, model: str) -> str:
        return model if model in self.models else UNKNOWN

    def observe_event(self, event: UsageEvent) -> None:
        tenant = self.tenant_label(event.tenant_id)
        model = self.model_label(event.model)
        lang = event.language or "und"
        for token_type, n in event.tokens_by_type().items():
            if n:
                self.child(self.tokens, tenant, event.origin_country, model, token_type.value, lang).inc(n)
        self.child(self.requests, tenant, model, event.outcome.value).inc()
        if event.prompt_chars:
            self.child(self.characters, model, lang, "prompt").inc(event.prompt_chars)
        if event.completion_chars:
            self.child(self.characters, model, lang, "completion").inc(event.completion_chars)
        if event.estimated:
            self.usage_estimated.labels(model).inc()

    def observe_commit(self, seconds: float, events: int) -> None:
        self.commit.observe(seconds)
        self.commit_batch.observe(events)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["OTHER", "TOKEN_TYPES", "UNKNOWN", "BoundedLabel", "Metrics", "Outcome"]
