"""Prepaid credit (issue 13): a paid top-up is a receipt numbered in its own gapless series, a
promotional grant is kept apart (and expires); finalizing applies promotional credit first, then paid,
at most the total; the invoice states both and its amount due (JSON, UBL PrepaidAmount/PayableAmount,
HTML), receivables owe only the amount due, and a void gives the credit back. And the withholding
statement: an invoice to a buyer whose country withholds (SA 5 %) says how much and what to pay."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from lxml import etree
from month_world import JAN, World, invoice_of, january, make_world

from billing import credits
from billing.document_store import NotFound
from billing.errors import InvalidUsage

UBL = {"cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"}


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def grant(
    w: World, tenant: str, amount: str, kind: str = "paid", expires_on: date | None = None
) -> credits.Grant:
    series = w.svc.config().seller.numbering  # read before the unit of work (it reads the store)
    with w.svc.store.unit() as tx:
        return credits.grant(
            tx,
            tenant_id=tenant,
            currency="USD",
            kind=kind,
            amount=Decimal(amount),
            reference=f"{kind} {amount}",
            expires_on=expires_on,
            series=series,
            now=w.svc.now(),
        )


def balance(w: World, tenant: str) -> dict[str, Decimal]:
    with w.svc.store.read() as conn:
        return credits.balance(conn, tenant, "USD", w.svc.now().date())


def close_january(w: World, tenant: str) -> str:
    january(w)
    w.svc.run(JAN)
    row = next(r for r in w.svc.finalize(JAN).finalized if r.tenant_id == tenant)
    assert row.number is not None
    number: str = row.number
    return number


def test_credit_is_applied_promotional_first_and_the_invoice_states_the_amount_due(world: World) -> None:
    first, second = grant(world, "kz-bank", "50.00"), grant(world, "kz-bank", "20.00")
    assert (first.number, second.number) == (
        "TP-RCP-2026-000001",
        "TP-RCP-2026-000002",
    )  # gapless, own series
    grant(world, "kz-bank", "10.00", "promotional", expires_on=date(2026, 12, 31))
    number = close_january(world, "kz-bank")
    inv = invoice_of(world, number)
    assert inv.total > 80
    assert inv.prepaid == (("promotional", Decimal("10.00")), ("paid", Decimal("70.00")))
    assert inv.amount_due == inv.total - 80
    doc = world.svc.store.get(number).document
    assert doc is not None and doc["amount_due"] == str(inv.amount_due)
    ubl = etree.fromstring(world.svc.render(number, "ubl"))
    assert ubl.findtext(".//cbc:PrepaidAmount", namespaces=UBL) == "80.00"
    assert ubl.findtext(".//cbc:PayableAmount", namespaces=UBL) == str(inv.amount_due)
    html = world.svc.render(number, "html").decode()  # kz-bank reads Russian
    assert "Зачтён промо-кредит" in html and "К оплате" in html
    status = world.svc.receivable(number)
    assert status.outstanding == inv.amount_due and status.prepaid == Decimal("80.00")
    assert balance(world, "kz-bank") == {"promotional": Decimal(0), "paid": Decimal(0)}
    paid = world.svc.pay(number, amount=inv.amount_due, on=date(2026, 2, 20), reference="wire")
    assert paid.status == "paid"


def test_more_credit_than_the_total_leaves_the_rest_and_a_void_gives_it_back(world: World) -> None:
    grant(world, "kz-bank", "100000.00")
    number = close_january(world, "kz-bank")
    inv = invoice_of(world, number)
    assert inv.prepaid == (("paid", inv.total),) and inv.amount_due == 0
    assert world.svc.receivable(number).status == "paid"
    assert balance(world, "kz-bank")["paid"] == Decimal("100000.00") - inv.total
    world.svc.void(number, reason="wrong legal name")
    assert balance(world, "kz-bank")["paid"] == Decimal("100000.00")  # the credit came back


def test_expired_promotional_credit_is_not_applied(world: World) -> None:
    grant(world, "kz-bank", "10.00", "promotional", expires_on=date(2026, 1, 31))  # issued 2026-02-xx
    inv = invoice_of(world, close_january(world, "kz-bank"))
    assert inv.prepaid == () and "amount_due" not in inv.to_json_dict()


@pytest.mark.parametrize(
    ("amount", "kind", "expires_on", "message"),
    [
        ("10.001", "paid", None, "more decimals than USD"),
        ("0", "paid", None, "positive amount"),
        ("-5", "promotional", None, "positive amount"),
        ("10", "paid", date(2026, 12, 31), "paid credit does not expire"),
        ("10", "gift", None, "credit kind must be one of"),
    ],
)
def test_bad_grants_are_refused_and_leave_no_trace(
    world: World, amount: str, kind: str, expires_on: date | None, message: str
) -> None:
    with pytest.raises(InvalidUsage, match=message):
        grant(world, "kz-bank", amount, kind, expires_on)
    with world.svc.store.read() as conn:
        assert credits.grants(conn, "kz-bank") == []
    assert grant(world, "kz-bank", "1.00").number == "TP-RCP-2026-000001"  # no number was used up


def test_two_top_ups_at_once_get_two_numbers(world: World) -> None:
    got: list[str | None] = []
    gate = threading.Barrier(2)

    def top_up() -> None:
        gate.wait()
        got.append(grant(world, "kz-bank", "5.00").number)

    threads = [threading.Thread(target=top_up) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(n or "" for n in got) == ["TP-RCP-2026-000001", "TP-RCP-2026-000002"]
    assert balance(world, "kz-bank")["paid"] == Decimal("10.00")


def test_an_invoice_to_a_withholding_country_states_the_tax_and_the_net_payment(world: World) -> None:
    number = close_january(world, "sa-retail")
    inv = invoice_of(world, number)
    w = inv.withholding
    assert w is not None and (w.country, w.rate) == ("SA", Decimal("5"))
    assert (
        w.amount == (inv.total * Decimal("0.05")).quantize(Decimal("0.01")) and w.net == inv.total - w.amount
    )
    ubl = world.svc.render(number, "ubl").decode()
    assert f"the buyer withholds 5 % ({w.amount} USD)" in ubl
    html = world.svc.render(number, "html").decode()  # Arabic
    assert "شهادة الاستقطاع" in html
    status = world.svc.pay(
        number, amount=w.net, on=date(2026, 2, 20), reference="wire", withheld=w.amount, certificate="WHT-1"
    )
    assert status.status == "paid"
    assert invoice_of(world, close_january_of_kz(world)).withholding is None  # KZ does not withhold here


def close_january_of_kz(world: World) -> str:
    row = next(
        r for r in world.svc.store.find(period=str(JAN), kinds=["invoice"]) if r.tenant_id == "kz-bank"
    )
    assert row.number is not None
    number: str = row.number
    return number


@pytest.mark.parametrize(
    ("language", "title"),
    [("en", "Receipt"), ("ru", "Квитанция"), ("ar", "إيصال"), ("kk", "Түбіртек"), ("zh", "收据")],
)
def test_a_paid_top_up_has_a_receipt_document(world: World, language: str, title: str) -> None:
    world.tenants.update_tenant("kz-bank", language=language)
    g = grant(world, "kz-bank", "125.50")
    assert g.number is not None
    doc = json.loads(world.svc.receipt(g.number, "json"))
    assert (doc["receipt_number"], doc["amount"], doc["currency"]) == (g.number, "125.50", "USD")
    html = world.svc.receipt(g.number, "html").decode()
    assert title in html and "Almaty Bank JSC" in html and "paid 125.50" in html
    pdf = world.svc.receipt(g.number, "pdf")
    assert pdf.startswith(b"%PDF") and pdf == world.svc.receipt(g.number, "pdf")  # reproducible
    text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
    assert g.number in text and title in text
    with pytest.raises(NotFound):
        world.svc.receipt("TP-RCP-2026-999999", "pdf")
