"""issue 13, month-close rules: a running period cannot be closed, invoices are dated the day they are
finalized, and numbers follow issue dates within a series. Each test fails on the code before the fix."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from month_world import JAN, NOW, World, invoice_of, january, make_world

from billing.errors import DocumentStateError
from metering.clock import Period


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def test_a_running_month_is_not_closed_unless_forced(world: World) -> None:
    """On 3 December, finalizing December used to issue invoices and close the month."""
    world.clock.now = datetime(2026, 12, 3, 9, tzinfo=UTC)
    dec = Period(2026, 12)
    world.use("kz-bank", date(2026, 12, 2), prompt=1_000_000)
    world.svc.run(dec)
    with pytest.raises(
        DocumentStateError, match="2026-12 is still open: it can be finalized from 2027-01-01"
    ):
        world.svc.finalize(dec)
    assert world.svc.store.closed_periods() == {}
    assert [r.status for r in world.svc.store.find(period="2026-12")] == ["draft"]
    forced = world.svc.finalize(dec, force=True)  # the explicit override: the caller audits `forced`
    assert forced.forced and forced.closed and [r.tenant_id for r in forced.finalized] == ["kz-bank"]
    assert forced.finalized[0].issue_date == date(2026, 12, 3)


def test_the_grace_after_the_period_end_is_configurable(tmp_path: Path) -> None:
    for world in make_world(tmp_path, finalize_grace=timedelta(days=2)):
        january(world)
        world.svc.run(JAN)
        world.clock.now = datetime(2026, 2, 2, 23, 59, tzinfo=UTC)
        with pytest.raises(DocumentStateError, match="finalized from 2026-02-03 00:00 UTC"):
            world.svc.finalize(JAN)
        world.clock.now = datetime(2026, 2, 3, tzinfo=UTC)
        assert not world.svc.finalize(JAN).forced


def test_an_invoice_is_dated_the_day_it_is_finalized(world: World) -> None:
    january(world)
    world.svc.run(JAN)  # on 2 February
    world.clock.now = NOW + timedelta(days=18)  # finalized on 20 February
    report = world.svc.finalize(JAN)
    assert not report.refused and len(report.finalized) == 4
    for row in report.finalized:
        inv = invoice_of(world, row.number or "")
        assert row.issue_date == inv.issue_date == date(2026, 2, 20)
        assert inv.due_date > inv.issue_date and inv.period_end == date(2026, 1, 31)


def test_a_draft_made_a_year_earlier_is_not_born_overdue(world: World) -> None:
    world.clock.now = datetime(2025, 12, 1, 9, tzinfo=UTC)
    world.use("kz-bank", date(2025, 11, 20), prompt=1_000_000)
    world.svc.import_fx(
        "date,base,quote,rate,source\n2025-11-30,USD,CNY,7.1100,PBOC:2025-11-30\n"
        "2025-11-01,USD,CNY,7.1100,PBOC:2025-11-01\n",
        origin="t.csv",
    )
    world.svc.run(Period(2025, 11))
    world.clock.now = datetime(2026, 12, 1, 9, tzinfo=UTC)
    [row] = world.svc.finalize(Period(2025, 11)).finalized
    inv = invoice_of(world, row.number or "")
    assert inv.issue_date == date(2026, 12, 1) and inv.due_date > date(2026, 12, 1)
    assert row.number == "TP-INV-2026-000001"


def test_numbers_follow_issue_dates_when_months_are_closed_out_of_order(world: World) -> None:
    """Closing September, then August, then July used to give numbers 1-3 dated 1 Oct, 1 Sep, 1 Aug."""
    world.clock.now = datetime(2026, 10, 5, 9, tzinfo=UTC)
    for month in (7, 8, 9):
        world.use("kz-bank", date(2026, month, 10), prompt=1_000_000)
    for day, month in ((5, 9), (6, 8), (7, 7)):
        world.clock.now = datetime(2026, 10, day, 9, tzinfo=UTC)
        world.svc.run(Period(2026, month))
        world.svc.finalize(Period(2026, month))
    issued = sorted(world.svc.store.find(statuses=["finalized"]), key=lambda r: r.number or "")
    assert [r.issue_date for r in issued] == [date(2026, 10, 5), date(2026, 10, 6), date(2026, 10, 7)]
    assert [r.period for r in issued] == ["2026-09", "2026-08", "2026-07"]


def test_a_backdated_credit_note_is_refused(world: World) -> None:
    january(world)
    world.svc.run(JAN)
    [first, second, *_] = world.svc.finalize(JAN).finalized
    world.clock.now = NOW + timedelta(days=10)
    world.svc.void(first.number or "", reason="wrong name")
    with pytest.raises(DocumentStateError, match="cannot be numbered after one dated 2026-02-12"):
        world.svc.void(second.number or "", reason="wrong name", issue_date=date(2026, 2, 5))
    assert world.svc.store.get(second.number or "").status == "finalized"  # nothing changed, no number used
    assert world.svc.store.counter("TP-CRN-2026") == 1
