"""Receivables (issue 13): payment status per invoice, payments net of withheld tax with the certificate,
write-offs, aging; attacked with overpayment, odd combinations and two payments at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from month_world import NOW, World, issued_in_january, make_world

from billing.errors import BillingError, DocumentStateError, InvalidUsage


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def test_a_payment_net_of_withholding_tax_with_its_certificate_settles_the_invoice(world: World) -> None:
    number = issued_in_january(
        world, "sa-retail"
    )  # SA: the buyer withholds 5 % (configs/billing/withholding.yaml)
    r = world.svc.receivable(number)
    assert (r.status, r.wht_rate, r.outstanding) == ("open", Decimal("5"), r.total)
    wht = (r.total * Decimal("0.05")).quantize(Decimal("0.01"))
    with pytest.raises(InvalidUsage, match="certificate"):
        world.svc.pay(number, amount=r.total - wht, on=date(2026, 2, 10), reference="SWIFT-1", withheld=wht)
    half = (r.total - wht) / 2
    part = world.svc.pay(
        number, amount=half.quantize(Decimal("0.01")), on=date(2026, 2, 10), reference="SWIFT-1"
    )
    assert part.status == "partially_paid"
    done = world.svc.pay(
        number,
        amount=part.outstanding - wht,
        on=date(2026, 2, 20),
        reference="SWIFT-2",
        withheld=wht,
        certificate="WHT-2026-0042",
    )
    assert (done.status, done.outstanding, done.withheld) == ("paid", Decimal(0), wht)
    with pytest.raises(DocumentStateError, match="more than the 0"):
        world.svc.pay(number, amount=Decimal("0.01"), on=date(2026, 2, 21), reference="again")


def test_odd_payments_are_refused(world: World) -> None:
    number = issued_in_january(world, "kz-bank")  # KZ does not withhold
    r = world.svc.receivable(number)
    with pytest.raises(InvalidUsage, match="does not withhold"):
        world.svc.pay(
            number,
            amount=Decimal(1),
            on=date(2026, 2, 3),
            reference="x",
            withheld=Decimal(1),
            certificate="c",
        )
    with pytest.raises(DocumentStateError, match="more than"):
        world.svc.pay(number, amount=r.total + Decimal("0.01"), on=date(2026, 2, 3), reference="x")
    with pytest.raises(InvalidUsage, match="positive"):
        world.svc.pay(number, amount=Decimal(-5), on=date(2026, 2, 3), reference="x")
    with pytest.raises(InvalidUsage, match="bank reference"):
        world.svc.pay(number, amount=Decimal(5), on=date(2026, 2, 3), reference=" ")
    world.svc.void(number, reason="wrong")
    with pytest.raises(DocumentStateError, match="only a finalized invoice takes payments"):
        world.svc.pay(number, amount=Decimal(5), on=date(2026, 2, 3), reference="x")


def test_two_payments_at_once_cannot_overpay(world: World) -> None:
    number = issued_in_january(world, "kz-bank")
    most = (world.svc.receivable(number).total * Decimal("0.6")).quantize(Decimal("0.01"))
    results: list[object] = []
    gate = threading.Barrier(2)

    def pay(ref: str) -> None:
        gate.wait()
        try:
            results.append(world.svc.pay(number, amount=most, on=date(2026, 2, 5), reference=ref))
        except BillingError as exc:
            results.append(exc)

    threads = [threading.Thread(target=pay, args=(f"ref-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, BillingError) for r in results) == 1, results
    assert world.svc.receivable(number).received == most


def test_overdue_aging_and_write_off(world: World) -> None:
    number = issued_in_january(world, "kz-bank")
    r = world.svc.receivable(number)
    world.clock.now = NOW + timedelta(days=(r.due_date - NOW.date()).days + 45)  # 45 days past due
    late = world.svc.receivable(number)
    assert late.status == "overdue"
    [row] = [a for a in world.svc.aging() if a["tenant"] == "kz-bank"]
    assert (
        row["31-60"] == str(late.outstanding)
        and row["current"] == "0"
        and row["total"] == str(late.outstanding)
    )
    assert world.svc.aging(as_of=r.due_date)[0]["current"] != "0"
    off = world.svc.write_off(number, reason="customer insolvent")
    assert (off.status, off.outstanding) == ("written_off", Decimal(0))
    assert not [a for a in world.svc.aging() if a["tenant"] == "kz-bank"]
    with pytest.raises(DocumentStateError):
        world.svc.write_off(number, reason="again")
