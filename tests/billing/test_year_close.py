"""A year of month closes as a finance team runs them (issue 13's scenario): December 2025 to November
2026 with the shipped price books and tax rules, so the new year changes prices (2025.2 -> 2026.1) and
the Russian VAT (20 -> 22 %); late usage every month, billed in the next invoice under its own month's
rules; a void with corrected tenant data and a re-issue; a partial credit; a prepaid tenant (paid
top-ups with receipts, promotional credit that expires); a buyer who withholds tax and pays net with
its certificate. At the end every number series is gapless and in date order, every ledger event is
billed exactly once by a live invoice, every document verifies against the ledger, and the money adds
up: receivables, credit balances and the aging report."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from month_world import World, invoice_of, make_world

from billing import credits
from billing.documents import Invoice
from billing.store import StoredDocument
from metering.clock import Period

MONTHS = [Period(2025, 12)] + [Period(2026, m) for m in range(1, 12)]


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def at(w: World, day: date, hour: int = 9) -> None:
    w.clock.now = datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def grant(w: World, kind: str, amount: str, expires_on: date | None = None) -> credits.Grant:
    series = w.svc.config().seller.numbering
    with w.svc.store.unit() as tx:
        return credits.grant(
            tx,
            tenant_id="kz-bank",
            currency="USD",
            kind=kind,
            amount=Decimal(amount),
            reference=f"{kind} {amount}",
            expires_on=expires_on,
            series=series,
            now=w.svc.now(),
        )


def next_month(p: Period) -> Period:
    return Period(p.year + p.month // 12, p.month % 12 + 1)


def close(w: World, p: Period) -> dict[str, str]:
    """Run and finalize `p` on the 2nd of the next month; tenant -> invoice number."""
    after = next_month(p)
    at(w, date(after.year, after.month, 2))
    w.svc.run(p)
    report = w.svc.finalize(p)
    assert not report.refused, report.refused
    return {r.tenant_id: r.number or "" for r in report.finalized}


def pay_net_of_withholding(w: World, number: str) -> None:
    """The Saudi buyer pays net of 5 % on the 20th, with its withholding certificate."""
    inv = invoice_of(w, number)
    assert inv.withholding is not None and inv.withholding.rate == Decimal(5)
    at(w, date(inv.issue_date.year, inv.issue_date.month, 20))
    paid = w.svc.pay(
        number,
        amount=inv.withholding.net,
        on=w.clock.now.date(),
        reference=f"wire {number}",
        withheld=inv.withholding.amount,
        certificate=f"WHT-{number}",
    )
    assert paid.status == "paid", paid


def assert_gapless_in_date_order(numbered: list[StoredDocument]) -> set[str]:
    series: dict[str, list[tuple[int, date]]] = {}
    for d in numbered:
        assert d.number is not None and d.issue_date is not None
        prefix, _, seq = d.number.rpartition("-")
        series.setdefault(prefix, []).append((int(seq), d.issue_date))
    for prefix, got in series.items():
        got.sort()
        assert [s for s, _ in got] == list(range(1, len(got) + 1)), prefix
        assert [d for _, d in got] == sorted(d for _, d in got), prefix
    return set(series)


def test_a_year_of_month_closes(world: World) -> None:
    w = world
    at(w, date(2025, 12, 1))
    receipt = grant(w, "paid", "40.00")
    grant(w, "promotional", "5.00", expires_on=date(2026, 6, 30))
    assert receipt.number == "TP-RCP-2025-000001"
    issued: dict[Period, dict[str, str]] = {}
    late_days: dict[Period, date] = {}
    for p in MONTHS:
        day = date(p.year, p.month, 10)
        w.use("ru-soft", day, prompt=1_000_000, completion=200_000, origin="RU")
        w.use("kz-bank", day, prompt=20_000_000, completion=5_000_000, origin="KZ")
        w.use("sa-retail", day, prompt=30_000_000, completion=5_000_000, origin="SA", language="ar")
        if p != MONTHS[0]:  # the previous month, arriving after it was closed: billed late
            before = MONTHS[MONTHS.index(p) - 1]
            late_days[before] = date(before.year, before.month, 28)
            w.use("ru-soft", late_days[before], prompt=500_000, origin="RU")
        if p == Period(2026, 6):
            at(w, date(2026, 6, 15))
            grant(w, "paid", "30.00")  # a mid-year top-up
        issued[p] = close(w, p)
        pay_net_of_withholding(w, issued[p]["sa-retail"])
        if p == Period(2026, 3):  # a wrong legal name: void, correct the tenant, re-issue
            at(w, date(2026, 4, 6))
            w.tenants.update_tenant("kz-bank", name="Almaty Bank JSC (corrected)")
            w.svc.void(issued[p]["kz-bank"], reason="wrong legal name")
            again = w.svc.reissue(issued[p]["kz-bank"])
            assert invoice_of(w, again.number or "").buyer.name == "Almaty Bank JSC (corrected)"
            issued[p]["kz-bank"] = again.number or ""
        if p == Period(2026, 6):  # an outage: a partial credit of the Russian invoice
            at(w, date(2026, 7, 8))
            w.svc.credit(issued[p]["ru-soft"], reason="outage 2026-06-21", amount=Decimal("0.05"))

    # the new year: December's late Russian usage billed in January at December's 20 %, January at 22 %
    jan = invoice_of(w, issued[Period(2026, 1)]["ru-soft"])
    rates = {(t.rate, t.periods) for t in jan.taxes}
    assert rates == {(Decimal(20), ("2025-12",)), (Decimal(22), ("2026-01",))}
    late = [line for line in jan.lines if line.period == "2025-12"]
    assert late and all(
        line.price_book_version is None or line.price_book_version == "2025.2" for line in late
    )

    docs = w.svc.store.find()
    numbered = [d for d in docs if d.number]
    # gapless series, numbers in date order
    assert assert_gapless_in_date_order(numbered) == {"TP-INV-2026", "TP-CRN-2026"}  # Dec 2025: issued 2 Jan

    # every ledger event billed exactly once by a live (finalized) invoice
    live = [d for d in numbered if d.kind == "invoice" and d.status == "finalized"]
    assert len(live) == 3 * len(MONTHS)  # the voided March invoice replaced by its re-issue
    for tenant in ("ru-soft", "kz-bank", "sa-retail"):
        seqs: list[int] = []
        for d in live:
            if d.tenant_id == tenant:
                inv = Invoice.from_json_dict(d.document or {})
                seqs += [s for a, b in inv.billed_events for s in range(a, b + 1)]
        events = list(w.usage.iter_events(tenant_id=tenant))
        assert sorted(seqs) == sorted(e.tenant_seq for e in events), tenant
    for d in numbered:
        assert w.svc.verify(d.number or "").ok, d.number

    # prepaid: 40 + 30 paid and 5 promotional (expired end of June) used on kz-bank's invoices
    applied = {"paid": Decimal(0), "promotional": Decimal(0)}
    for d in live:
        if d.tenant_id == "kz-bank":
            inv = Invoice.from_json_dict(d.document or {})
            for kind, amount in inv.prepaid:
                applied[kind] += amount
            assert w.svc.receivable(d.number or "").outstanding == inv.amount_due
    with w.svc.store.read() as conn:
        left = credits.balance(conn, "kz-bank", "USD", w.clock.now.date())
    assert applied["paid"] + left["paid"] == Decimal("70.00")
    # promotional first until it expired on 30 June (the June invoice, issued 2 July, found it gone)
    assert Decimal(0) < applied["promotional"] < Decimal("5.00") and left["promotional"] == 0
    assert applied["paid"] > 0

    # receivables: the Saudi buyer owes nothing; the aging report lists only what is really open
    aging = {(r["tenant"], r["currency"]): r for r in w.svc.aging(date(2026, 12, 31))}
    assert ("sa-retail", "USD") not in aging
    ru_june = w.svc.receivable(issued[Period(2026, 6)]["ru-soft"])
    assert ru_june.credited > 0 and ru_june.due == ru_june.total - ru_june.credited
    assert w.svc.run(Period(2026, 12)).drafts == []  # nothing billed twice, nothing left over
