"""billing.service: the month close over a real SQLite ledger filled with hand-made usage events.

Tenants in several countries (KZ business, SA business, RU business invoiced in CNY, AE consumer),
shipped configs (price books, tax rules, FX), January 2026. Every expectation is recomputed from
the ledger itself, never from the code under test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from month_world import FEB, JAN, S, World, invoice_of, january, line_tokens, make_world
from sqlalchemy import text

from billing.errors import DocumentStateError, InvalidUsage
from billing.ledger_read import parse_period
from billing.store import NotFound
from metering.clock import Period


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def test_run_bills_exactly_the_ledger_and_is_idempotent(world: World) -> None:
    january(world)
    first = world.svc.run(JAN)
    assert not first.errors and first.issue_date == date(2026, 2, 1)  # provisional: finalize dates it
    assert sorted(r.tenant_id for r in first.drafts) == ["ae-person", "kz-bank", "ru-soft", "sa-retail"]
    again = world.svc.run(JAN)
    assert [(r.id, r.document_bytes) for r in again.drafts] == [
        (r.id, r.document_bytes) for r in first.drafts
    ]
    for row in again.drafts:
        inv = invoice_of(world, row.ref)
        assert line_tokens(inv) == world.ledger_tokens(row.tenant_id, JAN), row.tenant_id
        assert inv.subtotal == sum((line.amount for line in inv.lines), Decimal(0))
        assert inv.subtotal + inv.tax_total == inv.total
        hashes = sorted(
            s.hash
            for s in world.usage.iter_events(tenant_id=row.tenant_id, start=JAN.start_at, end=JAN.end_at)
        )
        assert inv.usage_digest == "sha256:" + hashlib.sha256("\n".join(hashes).encode()).hexdigest()
        assert inv.price_book_version == "2026.1" and inv.tax_rule_id
    treatments = {r.tenant_id: invoice_of(world, r.ref).taxes[0].treatment for r in again.drafts}
    assert treatments == {
        "kz-bank": "reverse_charge",
        "sa-retail": "reverse_charge",
        "ru-soft": "supplier_charges",
        "ae-person": "not_collecting",
    }
    ru = invoice_of(world, "DRAFT-2026-01-ru-soft")
    assert ru.currency == "CNY" and ru.taxes[0].rate == Decimal(22)
    sa = invoice_of(world, "DRAFT-2026-01-sa-retail")
    assert [(f.to_currency, f.source, f.date) for f in sa.fx] == [
        ("SAR", "sample:SAMA", date(2026, 1, 31)),
        ("CNY", "sample:PBOC-central-parity", date(2026, 1, 1)),
    ]
    assert world.svc.render("DRAFT-2026-01-sa-retail", "html").startswith(b'<!DOCTYPE html>\n<html lang="ar"')


def test_finalize_numbers_once_and_documents_never_change(world: World) -> None:
    january(world)
    world.svc.run(JAN)
    report = world.svc.finalize(JAN)
    assert report.closed and not report.refused
    assert [r.number for r in report.finalized] == [f"TP-INV-2026-{i:06d}" for i in range(1, 5)]
    number = report.finalized[1].number or ""
    before = {fmt: world.svc.render(number, fmt) for fmt in ("json", "csv", "html", "pdf", "ubl")}
    assert before["json"] == world.svc.store.get(number).document_bytes
    assert json.loads(before["json"])["number"] == number
    # Later: more usage, a new run, and different prices in the config -- the issued invoice stays.
    world.use(report.finalized[1].tenant_id, date(2026, 1, 30), prompt=5_000_000)
    book = world.config_dir / "price_books.yaml"
    book.write_text(
        book.read_text(encoding="utf-8").replace('input: "0.020"', 'input: "9.000"'), encoding="utf-8"
    )
    world.svc.run(JAN)
    with pytest.raises(DocumentStateError):
        world.svc.finalize(JAN, tenant_id=report.finalized[1].tenant_id)
    assert {fmt: world.svc.render(number, fmt) for fmt in before} == before


def test_late_usage_goes_on_the_next_invoice_as_adjustment(world: World) -> None:
    january(world)
    world.svc.run(JAN)
    world.svc.finalize(JAN)
    jan_bytes = world.svc.render(world.svc.store.find(tenant_id="kz-bank", period="2026-01")[0].ref, "json")
    late = world.use("kz-bank", date(2026, 1, 28), prompt=3_000_000, completion=1_000_000, origin="TJ")
    new_tenant_late = world.use("ae-person", date(2026, 1, 29), completion=4_000_000, origin="AE")
    report = world.svc.run(FEB)
    kz = invoice_of(world, "DRAFT-2026-02-kz-bank")
    assert line_tokens(kz, "adjustment") == {
        (S, "input"): late.prompt_tokens,
        (S, "output"): late.completion_tokens,
    }
    assert line_tokens(kz) == world.ledger_tokens("kz-bank", FEB)
    assert all(line.adjustment for line in kz.lines if line.kind.value == "adjustment")
    ae = invoice_of(world, "DRAFT-2026-02-ae-person")  # no February usage: an adjustment-only invoice
    assert line_tokens(ae) == {} and line_tokens(ae, "adjustment") == {
        (S, "output"): new_tenant_late.completion_tokens
    }
    assert {r.tenant_id for r in report.drafts} == {"kz-bank", "ae-person"}
    world.clock.now = datetime(2026, 3, 2, 8, tzinfo=UTC)  # February has ended
    world.svc.finalize(FEB)
    assert (
        world.svc.render(world.svc.store.find(tenant_id="kz-bank", period="2026-01")[0].ref, "json")
        == jan_bytes
    )
    # Billed once: a March run finds nothing left of January.
    march = world.svc.run(Period(2026, 3))
    assert march.drafts == []


def test_closed_period_late_usage_of_a_tenant_without_invoice(world: World) -> None:
    """A tenant with no January usage at the close gets its late January usage on February's invoice."""
    january(world)
    world.tenants.create_tenant(id="kz-new", name="New LLP", billing_country="KZ", tax_id="987654321010")
    world.svc.run(JAN)
    world.use("kz-new", date(2026, 1, 31), prompt=2_000_000)  # after the run, before the close
    world.svc.finalize(JAN)
    world.use("kz-new", date(2026, 1, 15), completion=1_000_000)  # after the close
    assert world.svc.run(JAN).drafts == []  # a closed month gets no new drafts
    feb = invoice_of(world, next(r.ref for r in world.svc.run(FEB).drafts if r.tenant_id == "kz-new"))
    assert line_tokens(feb, "adjustment") == {(S, "input"): 2_000_000, (S, "output"): 1_000_000}


def test_errors_are_per_tenant_and_finalize_refuses_them(world: World) -> None:
    january(world)
    world.tenants.create_tenant(id="kz-typo", name="Typo LLP", billing_country="KZ", tax_id="123456789012")
    world.tenants.create_tenant(id="uz-gpu", name="GPU LLC", billing_country="UZ", tax_id="123456789")
    world.use("kz-typo", date(2026, 1, 5), prompt=1_000)
    world.use("uz-gpu", date(2026, 1, 5), model="mystery-70b", prompt=1_000)
    world.use("ghost", date(2026, 1, 5), prompt=1_000)
    report = world.svc.run(JAN)
    errors = dict(report.errors)
    assert "invalid tax id '123456789012' for KZ" in errors["kz-typo"]
    assert "no USD price for model 'mystery-70b'" in errors["uz-gpu"]
    assert "unknown tenant 'ghost'" in errors["ghost"]
    assert len(report.drafts) == 4  # the others are fine
    fin = world.svc.finalize(JAN)
    assert len(fin.finalized) == 4
    assert sorted(t for t, _ in fin.refused) == ["ghost", "kz-typo", "uz-gpu"]
    assert all("cannot finalize" in why for _, why in fin.refused)
    # Fix the price, run again: the refused tenant is billed (its month is still open for it).
    book = world.config_dir / "price_books.yaml"
    book.write_text(
        book.read_text(encoding="utf-8").replace(
            "          qwen2.5-7b-instruct:\n            input:\n              mode: graduated",
            '          mystery-70b: {input: "1.00", cached_input: "0.50", output: "2.00"}\n'
            "          qwen2.5-7b-instruct:\n            input:\n              mode: graduated",
            1,
        ),
        encoding="utf-8",
    )
    assert [r.tenant_id for r in world.svc.run(JAN, tenant_id="uz-gpu").drafts] == ["uz-gpu"]
    assert [r.number for r in world.svc.finalize(JAN, tenant_id="uz-gpu").finalized] == ["TP-INV-2026-000005"]


def test_missing_fx_rate_is_reported_until_imported(world: World) -> None:
    world.use("sa-retail", date(2025, 11, 20), prompt=10_000_000, origin="SA")
    nov = Period(2025, 11)
    report = world.svc.run(nov)
    [(tenant, error)] = report.errors
    assert tenant == "sa-retail" and "no FX rate USD->SAR for 2025-11-30" in error
    added, _ = world.svc.import_fx(
        "date,base,quote,rate,source\n2025-11-30,USD,SAR,3.7500,SAMA:2025-11-30\n"
        "2025-11-01,USD,CNY,7.1100,PBOC:2025-11-01\n",
        origin="nov.csv",
    )
    assert added == 2
    [row] = world.svc.run(nov).drafts
    inv = invoice_of(world, row.ref)
    assert {(f.to_currency, f.rate, f.source) for f in inv.fx} == {
        ("SAR", Decimal("3.7500"), "SAMA:2025-11-30"),
        ("CNY", Decimal("7.1100"), "PBOC:2025-11-01"),
    }
    assert inv.price_book_version == "2025.2"


def test_minimum_commitment_without_usage(world: World) -> None:
    world.tenants.create_tenant(
        id="t-sample-enterprise", name="Enterprise", billing_country="TR", tax_id="1234567890", currency="USD"
    )
    report = world.svc.run(JAN, tenant_id="t-sample-enterprise")
    [row] = report.drafts
    inv = invoice_of(world, row.ref)
    assert [(line.kind.value, line.amount) for line in inv.lines] == [
        ("minimum_commitment", Decimal("500.00"))
    ]
    assert inv.contract_id == "sample-enterprise-2026" and inv.subtotal == Decimal("500.00")


def test_void_issues_a_credit_note_and_reports_net_out(world: World) -> None:
    january(world)
    world.svc.run(JAN)
    fin = world.svc.finalize(JAN)
    before = world.svc.exports(JAN, by="tenant")
    target = next(r for r in fin.finalized if r.tenant_id == "kz-bank")
    invoice, credit = world.svc.void(target.number or "", reason="buyer name was wrong")
    assert (invoice.status, invoice.credit_note_number) == ("void", "TP-CRN-2026-000001")
    assert (credit.kind, credit.original_number, credit.total) == ("credit_note", target.number, target.total)
    note = json.loads(world.svc.render(credit.number or "", "json"))
    assert note["original_number"] == target.number and note["reason"] == "buyer name was wrong"
    assert note["issue_date"] == "2026-02-02"  # today per the clock, after the invoice's date
    assert json.loads(world.svc.render(target.number or "", "json"))["status"] == "void"
    with pytest.raises(DocumentStateError):
        world.svc.void(target.number or "", reason="again")
    with pytest.raises(DocumentStateError):
        world.svc.void(credit.number or "", reason="credit of a credit")
    after = {g.key: g for g in world.svc.exports(JAN, by="tenant").groups}
    assert after["kz-bank"].quantity_tokens == 0 and after["kz-bank"].revenue_cny == 0
    kept = {g.key: g for g in before.groups}
    assert all(after[k] == kept[k] for k in kept if k != "kz-bank")
    assert world.svc.store.counter("TP-INV-2026") == 4 and world.svc.store.counter("TP-CRN-2026") == 1


def test_exports_report_adds_up_to_the_invoices_and_the_ledger(world: World) -> None:
    january(world)
    world.svc.run(JAN)
    fin = world.svc.finalize(JAN)
    invoices = [invoice_of(world, r.number or "") for r in fin.finalized]
    ledger = world.usage.summary(["origin_country"], start=JAN.start_at, end=JAN.end_at)
    by_country = {
        str(r["origin_country"]): int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in ledger
    }
    report = world.svc.exports(JAN, by="country")
    assert {g.key: g.quantity_tokens for g in report.groups} == by_country
    assert report.revenue_cny == sum((i.ledger.net_amount for i in invoices), Decimal(0))
    for by in ("tenant", "model", "language"):
        other = world.svc.exports(JAN, by=by)
        assert (other.quantity_tokens, other.revenue_cny) == (report.quantity_tokens, report.revenue_cny)


def test_verify_recomputes_from_the_ledger_and_detects_tampering(world: World) -> None:
    january(world)
    world.svc.run(JAN)
    fin = world.svc.finalize(JAN)
    number = next(r.number for r in fin.finalized if r.tenant_id == "sa-retail") or ""
    ok = world.svc.verify(number)
    assert ok.ok and ok.events == 1
    with world.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE usage_events SET completion_tokens = completion_tokens + 1"
                " WHERE tenant_id = 'sa-retail'"
            )
        )
    bad = world.svc.verify(number)
    assert not bad.ok and any("quantities" in p for p in bad.problems)


def test_finalize_before_any_run_is_refused(world: World) -> None:
    january(world)
    with pytest.raises(DocumentStateError, match="run `tokenport invoices run --period 2026-01` first"):
        world.svc.finalize(JAN)
    with pytest.raises(DocumentStateError, match="2026-03 has not started yet"):  # the clock says 2026-02-02
        world.svc.finalize(Period(2026, 3))
    for wrong in (date(2025, 12, 31), date(2027, 2, 2)):
        with pytest.raises(
            InvalidUsage, match="must fall between the start of 2026-01 and a year after its end"
        ):
            world.svc.run(JAN, issue_date=wrong)
    for written in ("2026-13", "0000-01", "9999-12", "26-01"):
        with pytest.raises(InvalidUsage, match="YYYY-MM"):
            parse_period(written)
    with pytest.raises(NotFound, match="no tenant 'nobody'"):
        world.svc.run(JAN, tenant_id="nobody")
    assert world.svc.store.closed_periods() == {} and world.svc.store.find() == []
