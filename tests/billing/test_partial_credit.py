"""Partial credit notes (issue 13, corrections): some lines or a net amount, with a reason; tax at the
invoice's own rates; the credit notes of an invoice never exceed it, also when two are issued at once;
a partly credited invoice cannot be voided (that would credit it twice)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from month_world import World, issued_in_january, make_world

from billing.documents import CreditNote
from billing.errors import BillingError, DocumentStateError, InvalidUsage


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
    with pytest.raises(InvalidUsage, match="exceeds the invoice's net amount"):
        world.svc.credit(number, reason="too much", amount=invoice.subtotal + 1)
    world.svc.credit(number, reason="second credit", amount=part)
    with pytest.raises(DocumentStateError, match="would exceed the invoice total"):
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
    assert "would exceed" in str(refused[0])


def test_a_void_invoice_or_a_credit_note_cannot_be_credited(world: World) -> None:
    number = issued_in_january(world, "kz-bank")
    _inv, cn = world.svc.void(number, reason="wrong")
    with pytest.raises(DocumentStateError, match="only a finalized invoice can be credited"):
        world.svc.credit(number, reason="x", amount=Decimal(1))
    with pytest.raises(DocumentStateError):
        world.svc.credit(cn.ref, reason="x", amount=Decimal(1))
