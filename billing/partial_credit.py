"""Partial credit notes: some lines of an invoice, or an amount, credited with a reason (issue 13).

Pure, like billing/engine.py. A credit note for **lines** repeats those lines of the invoice as they
were (quantities, prices, amounts); one for an **amount** credits that net amount (before tax) spread
over every line in proportion to its amount, so each tax category and late supply gets its share.
Either way each tax entry is recomputed on the credited lines at the invoice's own rate (and its tax
currency at the invoice's own FX rate: the ratio of the invoice's two taxable amounts), rounded once,
and never more than what the earlier credit notes left of the invoice's tax: the note that credits the
last of a tax category takes exactly the rest, so credit notes line by line add up to the invoice to
the cent (rounding each on its own could pass it by one). A line is credited once; an amount is at most
what is left of the invoice's net amount, in whole minor units of its currency.

The earlier credit notes are read, and the total checked, under the invoice's lock
(billing/issuing.py `credit_invoice`), so two at once cannot both pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import date
from decimal import Decimal

from billing.documents import AppliedTax, CreditNote, Invoice, InvoiceLine, tax_of
from billing.engine import build_credit_note
from billing.errors import DocumentStateError, InvalidUsage
from billing.money import div, minor_units, mul, round_money, whole_minor_units

HUNDRED = Decimal(100)


def _scaled(line: InvoiceLine, share: Decimal, currency: str) -> InvoiceLine:
    quantity = int((Decimal(line.quantity_tokens) * share).to_integral_value())
    exact = mul(line.amount_unrounded, share)
    return replace(
        line, quantity_tokens=quantity, amount=round_money(exact, currency), amount_unrounded=exact
    )


def _lines_for_amount(invoice: Invoice, amount: Decimal, left: Decimal) -> list[InvoiceLine]:
    if amount <= 0:
        raise InvalidUsage("the amount to credit must be positive")
    if not whole_minor_units(amount, invoice.currency):
        raise InvalidUsage(
            f"the amount {amount} has more decimals than {invoice.currency} has"
            f" ({minor_units(invoice.currency)})"
        )
    if amount > left:
        raise InvalidUsage(
            f"the amount {amount} exceeds what is left to credit of the invoice's net amount: {left}"
            f" of {invoice.subtotal}"
        )
    share = div(amount, invoice.subtotal)
    lines = [_scaled(line, share, invoice.currency) for line in invoice.lines]
    drift = amount - sum((line.amount for line in lines), Decimal(0))  # rounding: the largest line absorbs it
    if drift:
        i = max(range(len(lines)), key=lambda k: abs(lines[k].amount))
        lines[i] = replace(
            lines[i], amount=lines[i].amount + drift, amount_unrounded=lines[i].amount_unrounded + drift
        )
    return lines


def _lines_chosen(invoice: Invoice, numbers: Sequence[int], prior: Sequence[CreditNote]) -> list[InvoiceLine]:
    if not numbers:
        raise InvalidUsage("name at least one line to credit")
    bad = [n for n in numbers if not 1 <= n <= len(invoice.lines)]
    if bad or len(set(numbers)) != len(numbers):
        raise InvalidUsage(
            f"lines must be distinct numbers from 1 to {len(invoice.lines)}, got {list(numbers)}"
        )
    for n in sorted(numbers):
        earlier = next((p for p in prior if invoice.lines[n - 1] in p.lines), None)
        if earlier is not None:
            raise InvalidUsage(f"line {n} was already credited by {earlier.number}")
    return [invoice.lines[n - 1] for n in sorted(numbers)]


TaxKey = tuple[str, Decimal, tuple[str, ...]]


def _key(tax: AppliedTax) -> TaxKey:
    return (tax.treatment, tax.rate, tax.periods)


def _credited_taxes(prior: Sequence[CreditNote]) -> dict[TaxKey, list[Decimal]]:
    """Per tax category: [taxable, tax, tax-currency taxable, tax-currency tax] already credited."""
    out: dict[TaxKey, list[Decimal]] = {}
    for note in prior:
        for t in note.taxes:
            acc = out.setdefault(_key(t), [Decimal(0)] * 4)
            acc[0] += t.taxable_amount
            acc[1] += t.amount
            acc[2] += t.tax_currency_taxable_amount or 0
            acc[3] += t.tax_currency_amount or 0
    return out


def _credited_tax(tax: AppliedTax, taxable: Decimal, done: list[Decimal], currency: str) -> AppliedTax:
    """``tax`` on ``taxable`` more of its base, capped by (or, closing the category, equal to) the rest."""
    closing = done[0] + taxable >= tax.taxable_amount
    exact = div(mul(taxable, tax.rate), HUNDRED)
    rest = tax.amount - done[1]
    amount = rest if closing else min(round_money(exact, currency), rest)
    entry = replace(tax, taxable_amount=taxable, amount=amount, amount_unrounded=exact)
    if tax.tax_currency and tax.tax_currency_taxable_amount is not None and tax.taxable_amount:
        local = mul(taxable, div(tax.tax_currency_taxable_amount, tax.taxable_amount))
        local_rest = tax.tax_currency_taxable_amount - done[2]
        local_tax_rest = (tax.tax_currency_amount or Decimal(0)) - done[3]
        local_tax = round_money(div(mul(local, tax.rate), HUNDRED), tax.tax_currency)
        entry = replace(
            entry,
            tax_currency_taxable_amount=local_rest
            if closing
            else min(round_money(local, tax.tax_currency), local_rest),
            tax_currency_amount=local_tax_rest if closing else min(local_tax, local_tax_rest),
        )
    return entry


def partial_credit_note(
    invoice: Invoice,
    *,
    reason: str,
    issue_date: date,
    lines: Sequence[int] | None = None,
    amount: Decimal | None = None,
    prior: Sequence[CreditNote] = (),
) -> CreditNote:
    """A draft credit note for some lines (1-based, as printed) or a net amount of ``invoice``, after
    the credit notes ``prior`` already issued against it."""
    if (lines is None) == (amount is None):
        raise InvalidUsage("credit either some lines or an amount, not both and not neither")
    full = build_credit_note(invoice, reason=reason, issue_date=issue_date)
    left = invoice.subtotal - sum((p.subtotal for p in prior), Decimal(0))
    chosen = (
        _lines_chosen(invoice, lines, prior)
        if lines is not None
        else _lines_for_amount(invoice, amount or Decimal(0), left)
    )
    done = _credited_taxes(prior)
    taxes = []
    for tax in invoice.taxes:
        mine = [line for line in chosen if tax_of(invoice, line) is tax]
        if mine:
            taxable = sum((line.amount for line in mine), Decimal(0))
            zero = [Decimal(0)] * 4
            taxes.append(_credited_tax(tax, taxable, done.get(_key(tax), zero), invoice.currency))
    subtotal = sum((line.amount for line in chosen), Decimal(0))
    if subtotal <= 0:
        raise InvalidUsage("nothing to credit: the chosen lines amount to zero")
    total = subtotal + sum((t.amount for t in taxes), Decimal(0))
    return replace(full, lines=tuple(chosen), taxes=tuple(taxes), subtotal=subtotal, total=total)


def check_headroom(invoice_total: Decimal, credited: Decimal, credit_total: Decimal, number: str) -> None:
    """The credit notes of an invoice never add up to more than the invoice."""
    if credited + credit_total > invoice_total:
        raise DocumentStateError(
            f"{number}: crediting {credit_total} more would exceed the invoice total {invoice_total}"
            f" ({credited} already credited)"
        )
