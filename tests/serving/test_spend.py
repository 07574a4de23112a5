"""SpendEstimator: prices looked up once per (tenant, month, model), the same estimate as pricing every
event."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from unittest import mock

import pytest

from billing.errors import BillingError
from billing.price_book import PriceBook, load
from billing.prices import PriceSource, load_price_source
from metering.clock import Period
from metering.events import TOKEN_TYPES, Outcome, UsageEvent
from metering.metrics import Metrics
from metering.tenants import Tenant
from serving.spend import SpendEstimator

BOOK = Path("configs/billing/price_books.yaml")
MODELS = ["smollm2-135m-instruct", "qwen2.5-7b-instruct", "not-priced"]
SPEND = "tokenport_estimated_spend_total"


def tenant(id: str, currency: str) -> Tenant:
    return Tenant(
        id=id,
        name=id,
        billing_country="DE",
        business=True,
        tax_id=None,
        currency=currency,
        language=None,
        allowed_models=None,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


TENANTS = {t.id: t for t in (tenant("acme", "USD"), tenant("han", "CNY"),
                             tenant("t-sample-enterprise", "USD"), tenant("euro", "EUR"))}  # fmt: skip


def event(
    i: int,
    tenant_id: str,
    model: str,
    started_at: datetime,
    prompt: int,
    cached: int,
    completion: int,
    country: str = "KZ",
) -> UsageEvent:
    return UsageEvent(
        request_id=f"req_{i}",
        tenant_id=tenant_id,
        key_id="k",
        model=model,
        origin_country=country,
        prompt_tokens=prompt,
        cached_prompt_tokens=cached,
        completion_tokens=completion,
        stream=False,
        outcome=Outcome.OK,
        started_at=started_at,
        finished_at=started_at,
    )


def reference_amount(book: PriceBook, t: Tenant, e: UsageEvent) -> Decimal | None:
    """Every event priced from scratch: the estimate the cache must reproduce."""
    month = Period.of(e.started_at)
    try:
        prices = book.select(
            currency=t.currency, period_start=month.start, period_end=month.end, tenant_id=t.id
        )
    except BillingError:
        return None
    amount = Decimal(0)
    for token_type, n in e.tokens_by_type().items():
        if n:
            try:
                amount += n * prices.price(e.model, token_type).tiers[0].price
            except BillingError:
                return None
    return amount or None


def spend(metrics: Metrics, tenant_id: str, currency: str, country: str) -> float:
    value = metrics.registry.get_sample_value(
        SPEND, {"tenant": tenant_id, "currency": currency, "origin_country": country}
    )
    return value or 0.0


@pytest.fixture
def book() -> PriceBook:
    return load(BOOK)


def test_the_same_estimate_as_pricing_every_event(book: PriceBook) -> None:
    metrics = Metrics(MODELS[:2])
    estimator = SpendEstimator(PriceSource.of(book), metrics, TENANTS.get)
    rng = random.Random(11)
    want: dict[tuple[str, str, str], float] = {}
    start = datetime(2025, 6, 20, tzinfo=UTC)  # June 2025: no price book yet; then 2025.2, then 2026.1
    for i in range(3000):
        tenant_id = rng.choice([*TENANTS, "unknown-tenant"])
        e = event(
            i,
            tenant_id,
            rng.choice(MODELS),
            start + timedelta(hours=rng.randint(0, 24 * 250)),
            prompt=(p := rng.choice([0, 1, 17, 1000, 123_457])),
            cached=rng.choice([0, p // 3, p]),
            completion=rng.choice([0, 5, 999]),
            country=rng.choice(["KZ", "UZ", "AE"]),
        )
        estimator.observe(e)
        t = TENANTS.get(tenant_id)
        amount = reference_amount(book, t, e) if t else None
        if t and amount:
            key = (tenant_id, t.currency, e.origin_country)
            want[key] = want.get(key, 0.0) + float(amount / Decimal(1_000_000))
    assert len(want) == 9  # 3 priced tenants x 3 countries
    for (tenant_id, currency, country), value in want.items():
        assert spend(metrics, tenant_id, currency, country) == pytest.approx(value, rel=1e-12)
    assert spend(metrics, "euro", "EUR", "KZ") == 0.0  # no EUR price book
    assert len(estimator._resolved) < 4 * 12 and len(estimator._units) < 4 * 12 * len(MODELS)


def test_prices_are_looked_up_once_per_tenant_month_and_model(book: PriceBook) -> None:
    metrics = Metrics(MODELS[:2])
    estimator = SpendEstimator(PriceSource.of(book), metrics, TENANTS.get)
    day = datetime(2026, 3, 5, 12, tzinfo=UTC)
    with mock.patch.object(PriceBook, "select", autospec=True, side_effect=PriceBook.select) as select:
        for i in range(100):
            estimator.observe(event(i, "acme", MODELS[i % 2], day + timedelta(minutes=i), 1000, 100, 50))
        assert select.call_count == 1
        estimator.observe(event(100, "acme", MODELS[0], datetime(2026, 4, 1, tzinfo=UTC), 1000, 100, 50))
        assert select.call_count == 2  # a new month
    # smollm2 2026.1 USD: input 0.020, cached 0.010, output 0.040 per million
    one = (900 * Decimal("0.020") + 100 * Decimal("0.010") + 50 * Decimal("0.040")) / Decimal(1_000_000)
    assert spend(metrics, "acme", "USD", "KZ") > 51 * float(one)


def test_a_month_runs_to_its_last_day() -> None:
    assert (Period.of(date(2024, 2, 10)).start, Period.of(date(2024, 2, 10)).end) == (
        date(2024, 2, 1),
        date(2024, 2, 29),
    )
    assert Period.of(date(2026, 12, 31)).end == date(2026, 12, 31)


def test_the_estimate_follows_the_shared_source_when_it_is_refreshed(tmp_path: Path) -> None:
    """Budgets, billing and the metric read one PriceSource: a refreshed file changes the estimate too."""
    path = tmp_path / "price_books.yaml"
    path.write_text(BOOK.read_text(encoding="utf-8"), encoding="utf-8")
    source = load_price_source(path)
    metrics = Metrics(MODELS[:2])
    estimator = SpendEstimator(source, metrics, TENANTS.get)
    day = datetime(2026, 3, 5, 12, tzinfo=UTC)
    estimator.observe(event(1, "acme", MODELS[0], day, 1_000_000, 0, 0))
    assert spend(metrics, "acme", "USD", "KZ") == pytest.approx(0.020)  # smollm2 2026.1 USD input 0.020
    path.write_text(
        path.read_text(encoding="utf-8").replace('input: "0.020"', 'input: "0.500"'), encoding="utf-8"
    )
    estimator.observe(event(2, "acme", MODELS[0], day, 1_000_000, 0, 0))
    assert spend(metrics, "acme", "USD", "KZ") == pytest.approx(0.040)  # not refreshed yet: same book
    source.refresh()
    estimator.observe(event(3, "acme", MODELS[0], day, 1_000_000, 0, 0))
    assert spend(metrics, "acme", "USD", "KZ") == pytest.approx(0.540)


def test_an_unusable_source_gives_no_estimate(tmp_path: Path) -> None:
    metrics = Metrics(MODELS[:2])
    broken = tmp_path / "price_books.yaml"
    broken.write_text("price_books: [\n", encoding="utf-8")
    source = load_price_source(broken)
    assert not source.available and "not valid YAML" in str(source.error)
    SpendEstimator(source, metrics, TENANTS.get).observe(
        event(1, "acme", MODELS[0], datetime(2026, 1, 10, tzinfo=UTC), 10, 0, 10)
    )
    assert spend(metrics, "acme", "USD", "KZ") == 0.0


def test_no_estimate_without_a_book_a_tenant_or_a_price(book: PriceBook) -> None:
    metrics = Metrics(MODELS[:2])
    day = datetime(2026, 1, 10, tzinfo=UTC)
    SpendEstimator(None, metrics, TENANTS.get).observe(event(1, "acme", MODELS[0], day, 10, 0, 10))
    estimator = SpendEstimator(PriceSource.of(book), metrics, TENANTS.get)
    estimator.observe(event(2, "nobody", MODELS[0], day, 10, 0, 10))
    estimator.observe(event(3, "acme", "not-priced", day, 10, 0, 10))
    estimator.observe(event(4, "acme", MODELS[0], day, 0, 0, 0))  # nothing to price
    assert spend(metrics, "acme", "USD", "KZ") == 0.0
    assert all(t in TOKEN_TYPES for t in event(5, "acme", MODELS[0], day, 1, 0, 1).tokens_by_type())
