"""Metrics: bounded labels, token split by type, unknown models."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from metering.events import Outcome
from metering.metrics import OTHER, UNKNOWN, BoundedLabel, Metrics
from tests.conftest import metric
from tests.metering.conftest import EventFactory


def test_bounded_label_caps_values_and_counts_overflow() -> None:
    r = CollectorRegistry()
    overflow = Counter("ovf", "x", ["label"], registry=r)
    values = Gauge("vals", "x", ["label"], registry=r)
    cap = Gauge("cap", "x", ["label"], registry=r)
    label = BoundedLabel("tenant", 3, overflow, values, cap)
    assert [label(v) for v in ["a", "b", "c"]] == ["a", "b", "c"]
    assert [label(v) for v in ["d", "a", "e", "c", "d"]] == [OTHER, "a", OTHER, "c", OTHER]
    assert r.get_sample_value("ovf_total", {"label": "tenant"}) == 3
    assert r.get_sample_value("vals", {"label": "tenant"}) == 3
    assert r.get_sample_value("cap", {"label": "tenant"}) == 3


def test_tenants_past_the_cap_share_other(event: EventFactory) -> None:
    m = Metrics({"m"}, max_tenants=2)
    for tenant in ["t1", "t2", "t3", "t4", "t1"]:
        m.observe_event(
            event(tenant_id=tenant, model="m", prompt_tokens=10, cached_prompt_tokens=4, completion_tokens=3)
        )
    text = m.render().decode()
    assert metric(text, "tokenport_requests_total", tenant="t1") == 2
    assert metric(text, "tokenport_requests_total", tenant="t2") == 1
    assert metric(text, "tokenport_requests_total", tenant="t3") == 0
    assert metric(text, "tokenport_requests_total", tenant=OTHER) == 2
    assert metric(text, "tokenport_tokens_total", tenant=OTHER, token_type="output") == 6
    assert metric(text, "tokenport_label_overflow_total", label="tenant") == 2
    assert metric(text, "tokenport_label_values", label="tenant") == 2
    assert metric(text, "tokenport_label_cap", label="tenant") == 2
    tenants = {s.labels["tenant"] for f in m.registry.collect() for s in f.samples if "tenant" in s.labels}
    assert tenants == {"t1", "t2", OTHER}


def test_tokens_split_by_type_and_unknown_model(event: EventFactory) -> None:
    m = Metrics({"known"})
    m.observe_event(
        event(
            tenant_id="a",
            model="known",
            origin_country="SA",
            language="ar",
            prompt_tokens=100,
            cached_prompt_tokens=30,
            completion_tokens=7,
            outcome=Outcome.OK,
        )
    )
    m.observe_event(
        event(
            tenant_id="a",
            model="someone-elses-model",
            prompt_tokens=5,
            cached_prompt_tokens=0,
            completion_tokens=1,
            language=None,
            outcome=Outcome.CLIENT_CANCELLED,
            estimated=True,
        )
    )
    text = m.render().decode()
    base = {"tenant": "a", "origin_country": "SA", "model": "known", "language": "ar"}
    assert metric(text, "tokenport_tokens_total", token_type="input", **base) == 70
    assert metric(text, "tokenport_tokens_total", token_type="cached_input", **base) == 30
    assert metric(text, "tokenport_tokens_total", token_type="output", **base) == 7
    assert metric(text, "tokenport_tokens_total", model=UNKNOWN, language="und", token_type="input") == 5
    assert metric(text, "tokenport_tokens_total", model=UNKNOWN, token_type="cached_input") == 0
    assert metric(text, "tokenport_requests_total", model=UNKNOWN, outcome="client_cancelled") == 1
    assert metric(text, "tokenport_usage_estimated_total", model=UNKNOWN) == 1
    assert metric(text, "tokenport_usage_estimated_total", model="known") == 0
    assert "someone-elses-model" not in text
    assert m.model_label("known") == "known" and m.model_label("x") == UNKNOWN


def test_known_models_start_at_zero_and_registries_are_separate() -> None:
    a, b = Metrics({"m1", "m2"}), Metrics({"m1"})
    text = a.render().decode()
    assert 'tokenport_usage_estimated_total{model="m1"} 0.0' in text
    assert 'tokenport_usage_estimated_total{model="m2"} 0.0' in text
    assert 'tokenport_inflight_requests{model="m2"} 0.0' in text
    assert "m2" not in b.render().decode()


def test_observe_commit() -> None:
    m = Metrics(set())
    m.observe_commit(0.002, 7)
    m.observe_commit(0.004, 1)
    text = m.render().decode()
    assert metric(text, "tokenport_ledger_commit_batch_events_count") == 2
    assert metric(text, "tokenport_ledger_commit_batch_events_sum") == 8
    assert metric(text, "tokenport_ledger_commit_seconds_count") == 2
