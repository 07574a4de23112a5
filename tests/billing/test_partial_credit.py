"""Partial credit notes (issue 13, corrections): some lines or a net amount, with a reason; tax at the
invoice's own rates; the credit notes of an invoice never exceed it, also when two are issued at once;
a partly credited invoice cannot be voided (that would credit it twice)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from month_world import World, issued_in_january, make_world

from billing.documents import CreditNote, Invoice
from billing.errors import BillingError, DocumentStateError, InvalidUsage
from billing.partial_credit import partial_credit_note


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def note_of(world: World, ref: str) -> CreditNote:
    doc = world.svc.store.get(ref).document
    assert doc is not None
    return CreditNote.from_json_dict(doc)


def test_crediting_lines_repeats_them_and_recomputes_the_tax(world: World) -> None:
    number = issued_in_january(world, "ru-soft")  # RU supplier_charges: 22 % VAT on the invoice
    invoice = world.svc.store.get(number)
    row = world.svc.credit(number, reason="line 1 was double counted", lines=[1])
    note = note_of(world, row.ref)
    inv_doc = world.svc.store.get(number).document
    assert inv_doc is not None
    first = inv_doc["lines"][0]
    assert [(str(line.quantity_tokens), str(line.amount)) for line in note.lines] == [
        (str(first["quantity_tokens"]), first["amount"])
    ]
    [tax] = note.taxes
    assert tax.rate == Decimal(inv_doc["taxes"][0]["rate"]) and tax.rate > 0
    assert tax.taxable_amount == note.subtotal == Decimal(first["amount"])
    assert tax.amount == (note.subtotal * tax.rate / 100).quantize(Decimal("0.01"))
    assert note.total == note.subtotal + tax.amount and note.original_number == number
    assert row.number is not None and row.number.startswith("TP-CRN-")
    assert world.svc.store.get(number).status == "finalized" == invoice.status  # the invoice stays issued
    assert world.svc.render(row.ref, "ubl").startswith(b"<?xml")


def test_crediting_an_amount_spreads_it_and_never_exceeds_the_invoice(world: World) -> None:
    number = issued_in_january(world, "kz-bank")
    invoice = world.svc.store.get(number)
    assert invoice.subtotal is not None and invoice.total is not None
    part = (invoice.subtotal / 3).quantize(Decimal("0.01"))
    first = world.svc.credit(number, reason="service credit: outage", amount=part)
    note = note_of(world, first.ref)
    assert note.subtotal == part and len(note.lines) == len(world.svc.store.get(number).document["lines"])
    with pytest.raises(InvalidUsage, match="exceeds what is left to credit"):
        world.svc.credit(number, reason="too much", amount=invoice.subtotal + 1)
    world.svc.credit(number, reason="second credit", amount=part)
    with pytest.raises(InvalidUsage, match="exceeds what is left to credit"):
        world.svc.credit(number, reason="third: over the invoice", amount=part + Decimal("0.05"))
    with pytest.raises(DocumentStateError, match="partial credit notes"):
        world.svc.void(number, reason="void after partial credits")
    with pytest.raises(InvalidUsage, match="not both"):
        world.svc.credit(number, reason="odd", lines=[1], amount=Decimal(1))
    with pytest.raises(InvalidUsage, match="distinct numbers"):
        world.svc.credit(number, reason="odd", lines=[99])
    with pytest.raises(DocumentStateError, match="a credit note needs a reason"):
        world.svc.credit(number, reason=" ", amount=Decimal(1))


def test_two_credits_at_once_cannot_both_pass_the_cap(world: World) -> None:
    number = issued_in_january(world, "kz-bank")
    total = world.svc.store.get(number).subtotal
    assert total is not None
    most = (total * Decimal("0.6")).quantize(Decimal("0.01"))  # two of these exceed the invoice
    results: list[object] = []
    gate = threading.Barrier(2)

    def credit() -> None:
        gate.wait()
        try:
            results.append(world.svc.credit(number, reason="concurrent", amount=most))
        except BillingError as exc:
            results.append(exc)

    threads = [threading.Thread(target=credit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if isinstance(r, BillingError)]
    assert len(results) == 2 and len(refused) == 1, results
    assert "exceeds what is left to credit" in str(refused[0])  # the second saw the first, under the lock


def test_a_void_invoice_or_a_credit_note_cannot_be_credited(world: World) -> None:
    number = issued_in_january(world, "kz-bank")
    _inv, cn = world.svc.void(number, reason="wrong")
    with pytest.raises(DocumentStateError, match="only a finalized invoice can be credited"):
        world.svc.credit(number, reason="x", amount=Decimal(1))
    with pytest.raises(DocumentStateError):
        world.svc.credit(cn.ref, reason="x", amount=Decimal(1))


def test_credits_line_by_line_add_up_to_the_invoice_to_the_cent(world: World) -> None:
    """Two lines of 0.03 at 22 %: each line's tax rounds to 0.01, the invoice's (0.0132) to 0.01. The
    second credit note takes the tax that is left (0.00), so both add up to the invoice's 0.07."""
    number = issued_in_january(world, "ru-soft")
    doc = world.svc.store.get(number).document
    assert doc is not None
    real = Invoice.from_json_dict(doc)
    cents = Decimal("0.03")
    lines = tuple(
        replace(
            real.lines[0],
            quantity_tokens=real.lines[0].quantity_tokens + i,
            amount=cents,
            amount_unrounded=cents,
        )
        for i in range(2)
    )
    [tax] = real.taxes
    tax = replace(tax, taxable_amount=2 * cents, amount=Decimal("0.01"), amount_unrounded=Decimal("0.0132"))
    invoice = replace(real, lines=lines, taxes=(tax,), subtotal=2 * cents, total=Decimal("0.07"))
    first = partial_credit_note(invoice, reason="line 1", issue_date=invoice.issue_date, lines=[1])
    assert first.total == Decimal("0.04")  # 0.03 + 0.0066 rounded up
    second = partial_credit_note(
        invoice, reason="line 2", issue_date=invoice.issue_date, lines=[2], prior=[first]
    )
    assert (second.taxes[0].amount, second.total) == (Decimal("0.00"), Decimal("0.03"))
    assert first.total + second.total == invoice.total
    with pytest.raises(InvalidUsage, match="line 1 was already credited"):
        partial_credit_note(invoice, reason="again", issue_date=invoice.issue_date, lines=[1], prior=[first])


def test_every_line_credited_through_the_service_adds_up_and_a_line_is_credited_once(world: World) -> None:
    number = issued_in_january(world, "ru-soft")
    invoice = world.svc.store.get(number)
    assert invoice.document is not None and invoice.total is not None
    count = len(invoice.document["lines"])
    notes = [world.svc.credit(number, reason=f"line {n}", lines=[n]) for n in range(1, count + 1)]
    assert sum((n.total or Decimal(0) for n in notes), Decimal(0)) == invoice.total
    with pytest.raises(InvalidUsage, match="line 1 was already credited by TP-CRN-"):
        world.svc.credit(number, reason="twice", lines=[1])


def test_amounts_finer_than_the_currency_and_the_drift_line_stay_consistent(world: World) -> None:
    number = issued_in_january(world, "kz-bank")
    with pytest.raises(InvalidUsage, match=r"0\.005 has more decimals than USD has \(2\)"):
        world.svc.credit(number, reason="half a cent", amount=Decimal("10.005"))
    with pytest.raises(InvalidUsage, match="more decimals than USD"):
        world.svc.pay(number, amount=Decimal("1.001"), on=date(2027, 2, 3), reference="wire 1")
    row = world.svc.credit(number, reason="a third", amount=Decimal("10.01"))
    note = note_of(world, row.ref)
    assert sum((line.amount for line in note.lines), Decimal(0)) == Decimal("10.01")
    for line in note.lines:  # the line that absorbed the rounding drift says the same amount unrounded
        assert abs(line.amount_unrounded - line.amount) < Decimal("0.01"), line
