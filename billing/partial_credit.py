"""Partial credit notes: some lines of an invoice, or an amount, credited with a reason (issue 13).

Pure, like billing/engine.py. A credit note for **lines** repeats those lines of the invoice as they
were (quantities, prices, amounts); one for an **amount** credits that net amount (before tax) spread
over every line in proportion to its amount, so each tax category and late supply gets its share.
Either way each tax entry is recomputed on the credited lines at the invoice's own rate (and its tax
currency at the invoice's own FX rate: the ratio of the invoice's two taxable amounts), rounded once.

What may be credited in total never exceeds the invoice: billing/issuing.py checks the credit notes
already issued under the invoice's lock, so two at once cannot both pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import date
from decimal import Decimal

from billing.documents import CreditNote, Invoice, InvoiceLine, tax_of
from billing.engine import build_credit_note
from billing.errors import DocumentStateError, InvalidUsage
from billing.money import div, mul, round_money

HUNDRED = Decimal(100)


def _scaled(line: InvoiceLine, share: Decimal, currency: str) -> InvoiceLine:
    quantity = int((Decimal(line.quantity_tokens) * share).to_integral_value())
    exact = mul(line.amount_unrounded, share)
    return replace(
        line, quantity_tokens=quantity, amount=round_money(exact, currency), amount_unrounded=exact
    )


def _lines_for_amount(invoice: Invoice, amount: Decimal) -> list[InvoiceLine]:
    if amount <= 0:
        raise InvalidUsage("the amount to credit must be positive")
    if amount > invoice.subtotal:
        raise InvalidUsage(f"the amount {amount} exceeds the invoice's net amount {invoice.subtotal}")
    share = div(amount, invoice.subtotal)
    lines = [_scaled(line, share, invoice.currency) for line in invoice.lines]
    drift = amount - sum((line.amount for line in lines), Decimal(0))  # rounding: the largest line absorbs it
    if drift:
        i = max(range(len(lines)), key=lambda k: abs(lines[k].amount))
        lines[i] = replace(lines[i], amount=lines[i].amount + drift)
    return lines


def _lines_chosen(invoice: Invoice, numbers: Sequence[int]) -> list[InvoiceLine]:
    if not numbers:
        raise InvalidUsage("name at least one line to credit")
    bad = [n for n in numbers if not 1 <= n <= len(invoice.lines)]
    if bad or len(set(numbers)) != len(numbers):
        raise InvalidUsage(
            f"lines must be distinct numbers from 1 to {len(invoice.lines)}, got {list(numbers)}"
        )
    return [invoice.lines[n - 1] for n in sorted(numbers)]


def partial_credit_note(
    invoice: Invoice,
    *,
    reason: str,
    issue_date: date,
    lines: Sequence[int] | None = None,
    amount: Decimal | None = None,
) -> CreditNote:
    """A draft credit note for some lines (1-based, as printed) or a net amount of ``invoice``."""
    if (lines is None) == (amount is None):
        raise InvalidUsage("credit either some lines or an amount, not both and not neither")
    full = build_credit_note(invoice, reason=reason, issue_date=issue_date)
    chosen = (
        _lines_chosen(invoice, lines)
        if lines is not None
        else _lines_for_amount(invoice, amount or Decimal(0))
    )
    taxes = []
    for tax in invoice.taxes:
        mine = [line for line in chosen if tax_of(invoice, line) is tax]
        taxable = sum((line.amount for line in mine), Decimal(0))
        if not mine:
            continue
        exact = div(mul(taxable, tax.rate), HUNDRED)
        entry = replace(
            tax, taxable_amount=taxable, amount=round_money(exact, invoice.currency), amount_unrounded=exact
        )
        if tax.tax_currency and tax.tax_currency_taxable_amount is not None and tax.taxable_amount:
            local = mul(taxable, div(tax.tax_currency_taxable_amount, tax.taxable_amount))
            entry = replace(
                entry,
                tax_currency_taxable_amount=round_money(local, tax.tax_currency),
                tax_currency_amount=round_money(div(mul(local, tax.rate), HUNDRED), tax.tax_currency),
            )
        taxes.append(entry)
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
