"""A quarter closed as a finance team would: a tax rate change at the new year, a price change inside
January, late December usage billed in January under December's rules, a void and a re-issue. Every
figure is recomputed here from the prices and rates written in this test."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from month_world import S, World, invoice_of, make_world

from metering.clock import Period

DEC, JAN = Period(2025, 12), Period(2026, 1)
BOOK = {
    "price_books": [
        {
            "version": "2025.2",
            "effective_from": "2025-07-01",
            "effective_to": "2025-12-31",
            "currencies": {
                "CNY": {"models": {S: {"input": "0.18", "cached_input": "0.09", "output": "0.36"}}}
            },
        },
        {
            "version": "2026.1",
            "effective_from": "2026-01-01",
            "effective_to": "2026-01-15",
            "currencies": {
                "CNY": {"models": {S: {"input": "0.15", "cached_input": "0.07", "output": "0.30"}}}
            },
        },
        {
            "version": "2026.2",
            "effective_from": "2026-01-16",
            "currencies": {
                "CNY": {"models": {S: {"input": "0.20", "cached_input": "0.07", "output": "0.30"}}}
            },
        },
    ]
}


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def test_a_quarter_with_rate_and_price_changes_late_usage_and_a_reissue(world: World) -> None:
    (world.config_dir / "price_books.yaml").write_text(yaml.safe_dump(BOOK), encoding="utf-8")
    world.use("ru-soft", date(2025, 12, 5), prompt=10_000_000, origin="RU")
    world.clock.now = datetime(2026, 1, 2, 9, tzinfo=UTC)
    world.svc.run(DEC)
    [dec] = world.svc.finalize(DEC).finalized
    assert (dec.issue_date, dec.total) == (date(2026, 1, 2), Decimal("2.16"))  # 1.80 + 20 %

    world.use("ru-soft", date(2025, 12, 30), prompt=5_000_000, origin="RU")  # late December
    world.use("ru-soft", date(2026, 1, 10), prompt=4_000_000, origin="RU")  # 2026.1: 0.15
    world.use("ru-soft", date(2026, 1, 20), prompt=6_000_000, origin="RU")  # 2026.2: 0.20
    world.clock.now = datetime(2026, 2, 3, 9, tzinfo=UTC)
    world.svc.run(JAN)
    [jan] = world.svc.finalize(JAN).finalized
    inv = invoice_of(world, jan.number or "")
    assert [(line.period, line.price_book_version, line.amount) for line in inv.lines] == [
        (None, "2026.1", Decimal("0.60")),
        (None, "2026.2", Decimal("1.20")),
        ("2025-12", None, Decimal("0.90")),
    ]
    assert {(t.rate, t.taxable_amount, t.amount) for t in inv.taxes} == {
        (Decimal(22), Decimal("1.80"), Decimal("0.40")),
        (Decimal(20), Decimal("0.90"), Decimal("0.18")),
    }
    assert inv.total == Decimal("3.28") and inv.issue_date == date(2026, 2, 3)

    world.clock.now = datetime(2026, 2, 10, 9, tzinfo=UTC)
    world.svc.void(jan.number or "", reason="wrong legal name")
    again = world.svc.reissue(jan.number or "")
    re_inv = invoice_of(world, again.number or "")
    assert re_inv.total == inv.total and re_inv.issue_date == date(2026, 2, 10)
    assert [line.amount for line in re_inv.lines] == [line.amount for line in inv.lines]
    assert [r.number for r in world.svc.store.find(statuses=["finalized"], kinds=["invoice"])] == [
        "TP-INV-2026-000001",
        "TP-INV-2026-000003",
    ]
    for number in ("TP-INV-2026-000001", "TP-INV-2026-000002", "TP-INV-2026-000003", "TP-CRN-2026-000001"):
        assert world.svc.verify(number).ok, number
    assert world.svc.run(Period(2026, 2)).drafts == []  # nothing billed twice, nothing left over
