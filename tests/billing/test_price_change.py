"""issue 13, prices that change inside a month: usage is prorated by event day (lines per price book version)
instead of refusing the close, and the loader refuses only what is inconsistent (overlaps, gaps)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from month_world import JAN, Q, S, World, invoice_of, make_world

from billing.errors import ConfigError
from billing.price_book import parse

A = {
    "version": "2026.1a",
    "effective_from": "2025-07-01",
    "effective_to": "2026-01-15",
    "currencies": {
        "USD": {
            "models": {
                S: {"input": "0.020", "cached_input": "0.010", "output": "0.040"},
                Q: {
                    "input": {
                        "mode": "graduated",
                        "tiers": [{"up_to": 15_000_000, "price": "0.30"}, {"up_to": None, "price": "0.24"}],
                    },
                    "cached_input": "0.075",
                    "output": "0.90",
                },
            }
        }
    },
}
B = {
    "version": "2026.1b",
    "effective_from": "2026-01-16",
    "currencies": {
        "USD": {
            "models": {
                S: {"input": "0.050", "cached_input": "0.010", "output": "0.040"},
                Q: {
                    "input": {
                        "mode": "graduated",
                        "tiers": [{"up_to": 15_000_000, "price": "0.60"}, {"up_to": None, "price": "0.48"}],
                    },
                    "cached_input": "0.075",
                    "output": "0.90",
                },
            }
        }
    },
}


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def test_a_mid_month_price_change_is_prorated_by_event_day(world: World) -> None:
    (world.config_dir / "price_books.yaml").write_text(
        yaml.safe_dump({"price_books": [A, B]}), encoding="utf-8"
    )
    world.use("kz-bank", date(2026, 1, 10), prompt=10_000_000)
    world.use("kz-bank", date(2026, 1, 15), model=Q, prompt=10_000_000)
    world.use("kz-bank", date(2026, 1, 16), prompt=10_000_000)
    world.use("kz-bank", date(2026, 1, 31), model=Q, prompt=10_000_000)
    report = world.svc.run(JAN, tenant_id="kz-bank")
    assert not report.errors, report.errors
    inv = invoice_of(world, report.drafts[0].ref)
    lines = [
        (line.model, line.price_book_version, line.quantity_tokens, line.tier, line.amount)
        for line in inv.lines
    ]
    assert lines == [
        (Q, "2026.1a", 10_000_000, 1, Decimal("3.00")),  # 10M x 0.30
        (S, "2026.1a", 10_000_000, None, Decimal("0.20")),  # 10M x 0.020
        (Q, "2026.1b", 5_000_000, 1, Decimal("3.00")),  # the tiers run on through the month: 5M x 0.60
        (Q, "2026.1b", 5_000_000, 2, Decimal("2.40")),  # then 5M x 0.48
        (S, "2026.1b", 10_000_000, None, Decimal("0.50")),  # 10M x 0.050
    ]
    assert inv.price_book_version == "2026.1a, 2026.1b" and inv.subtotal == Decimal("9.10")


def book(*versions: dict[str, Any]) -> dict[str, Any]:
    return {"price_books": list(versions)}


def test_the_loader_refuses_gaps_and_overlaps_only() -> None:
    assert parse(book(A, B)).spans(
        currency="USD", period_start=date(2026, 1, 1), period_end=date(2026, 1, 31)
    ) == [(date(2026, 1, 1), date(2026, 1, 15)), (date(2026, 1, 16), date(2026, 1, 31))]
    with pytest.raises(ConfigError, match="USD has no prices from 2026-01-16 to 2026-01-19"):
        parse(book(A, dict(B, effective_from="2026-01-20")), file="p.yaml")
    with pytest.raises(ConfigError, match="overlap"):
        parse(book(A, dict(B, effective_from="2026-01-15")), file="p.yaml")


def test_budgets_and_the_spend_metric_follow_the_version_in_force_that_day() -> None:
    from datetime import UTC, datetime

    from billing.prices import PriceSource
    from metering.events import Outcome, TokenType, UsageEvent
    from metering.metrics import Metrics
    from metering.tenants import Tenant
    from serving.limits.pricing import PriceBookPricer
    from serving.spend import SpendEstimator

    source = PriceSource.of(parse(book(A, B)))
    pricer = PriceBookPricer(source)
    assert pricer.price(S, TokenType.INPUT, 1_000_000, "USD", on=date(2026, 1, 10)) == Decimal("0.020")
    assert pricer.price(S, TokenType.INPUT, 1_000_000, "USD", on=date(2026, 1, 20)) == Decimal("0.050")
    acme = Tenant(
        id="acme",
        name="acme",
        billing_country="DE",
        business=True,
        tax_id=None,
        currency="USD",
        language=None,
        allowed_models=None,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )
    metrics = Metrics([S])
    spend = SpendEstimator(source, metrics, {"acme": acme}.get)
    for i, day in enumerate((10, 20)):
        when = datetime(2026, 1, day, tzinfo=UTC)
        spend.observe(
            UsageEvent(
                request_id=f"r{i}",
                tenant_id="acme",
                key_id="k",
                model=S,
                origin_country="KZ",
                prompt_tokens=1_000_000,
                cached_prompt_tokens=0,
                completion_tokens=0,
                stream=False,
                outcome=Outcome.OK,
                started_at=when,
                finished_at=when,
            )
        )
    value = metrics.registry.get_sample_value(
        "tokenport_estimated_spend_total", {"tenant": "acme", "currency": "USD", "origin_country": "KZ"}
    )
    assert value == pytest.approx(0.070)  # 0.020 before the change + 0.050 after
