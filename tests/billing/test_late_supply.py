"""issue 13, late usage as its own supply: the prices, tier position, tax rule and FX date of the period the
late events belong to, on adjustment lines that name that period. Each test fails on the code before."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from month_world import JAN, Q, World, invoice_of, make_world

from billing.documents import tax_of
from billing.price_book import PriceSpec, Segment, Tier, TierMode
from billing.supplies import continued_segments
from metering.clock import Period

DEC = Period(2025, 12)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def test_december_usage_billed_in_january_keeps_december_prices_and_rate(world: World) -> None:
    """RU: 2025.2 prices and 20 % for the December supply, 2026.1 prices and 22 % for January's."""
    world.use("ru-soft", date(2025, 12, 10), prompt=10_000_000, origin="RU")
    world.svc.run(DEC)
    assert world.svc.finalize(DEC).finalized
    world.use("ru-soft", date(2025, 12, 20), prompt=5_000_000, origin="RU")  # late December
    world.use("ru-soft", date(2026, 1, 15), prompt=7_000_000, origin="RU")
    [row] = world.svc.run(JAN, tenant_id="ru-soft").drafts
    inv = invoice_of(world, row.ref)
    lines = {(line.kind.value, line.period, line.unit_price_per_million, line.amount) for line in inv.lines}
    assert lines == {
        ("usage", None, Decimal("0.15"), Decimal("1.05")),  # 7M x 0.15 CNY (2026.1)
        ("adjustment", "2025-12", Decimal("0.18"), Decimal("0.90")),
    }  # 5M x 0.18 CNY (2025.2)
    taxes = {(t.rate, t.taxable_amount, t.amount, t.periods) for t in inv.taxes}
    assert taxes == {
        (Decimal(22), Decimal("1.05"), Decimal("0.23"), ("2026-01",)),
        (Decimal(20), Decimal("0.90"), Decimal("0.18"), ("2025-12",)),
    }
    assert inv.total == Decimal("1.95") + Decimal("0.41")
    assert inv.to_json_dict()["lines"][1]["period"] == "2025-12"
    # Each line is taxed by the entry of its supply (renderers classify lines with tax_of).
    assert [tax_of(inv, line).rate for line in inv.lines] == [Decimal(22), Decimal(20)]


def test_late_tokens_continue_the_tiers_of_their_month(world: World) -> None:
    """kz-bank had 80M qwen input and 50M output in January; 45M more of each arrive late."""
    world.use("kz-bank", date(2026, 1, 10), model=Q, prompt=80_000_000, completion=50_000_000)
    world.svc.run(JAN)
    world.svc.finalize(JAN)
    world.use("kz-bank", date(2026, 1, 30), model=Q, prompt=45_000_000, completion=45_000_000)
    world.clock.now = world.clock.now.replace(month=3)
    [row] = world.svc.run(Period(2026, 2)).drafts
    inv = invoice_of(world, row.ref)
    late = [
        (line.token_type.value if line.token_type else None, line.quantity_tokens, line.tier, line.amount)
        for line in inv.lines
        if line.period == "2026-01"
    ]
    assert late == [
        ("input", 20_000_000, 1, Decimal("6.00")),  # graduated: up to 100M at 0.30
        ("input", 25_000_000, 2, Decimal("6.00")),  # then 0.24
        ("output", 45_000_000, 2, Decimal("36.00")),  # volume: 95M in January -> tier 2, 0.80
    ]
    ledger = {(f.purpose, f.date) for f in inv.fx}
    # KZ converts at the first of the supply's month: the January supply at January's rate
    assert {("ledger", date(2026, 1, 1)), ("ledger", date(2026, 2, 1))} <= ledger


def test_continued_segments() -> None:
    graduated = PriceSpec(TierMode.GRADUATED, (Tier(100, Decimal(3)), Tier(None, Decimal(1))))
    assert continued_segments(graduated, 0, 150) == [Segment(1, 100, Decimal(3)), Segment(2, 50, Decimal(1))]
    assert continued_segments(graduated, 90, 20) == [Segment(1, 10, Decimal(3)), Segment(2, 10, Decimal(1))]
    assert continued_segments(graduated, 200, 5) == [Segment(2, 5, Decimal(1))]
    volume = PriceSpec(TierMode.VOLUME, (Tier(100, Decimal(3)), Tier(None, Decimal(1))))
    assert continued_segments(volume, 90, 20) == [Segment(2, 20, Decimal(1))]
    flat = PriceSpec(TierMode.FLAT, (Tier(None, Decimal(2)),))
    assert continued_segments(flat, 10**9, 7) == [Segment(None, 7, Decimal(2))]
    assert continued_segments(flat, 0, 0) == []
