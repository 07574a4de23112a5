"""CSV rendering: one row per line, then subtotal, tax and total rows (amounts as decimal strings)."""

from __future__ import annotations

import csv
import io

from billing.documents import CreditNote, Invoice
from billing.money import fmt

COLUMNS = (
    "document",
    "kind",
    "row",
    "line_kind",
    "model",
    "token_type",
    "tier",
    "quantity_tokens",
    "unit_price_per_million",
    "amount",
    "currency",
    "treatment",
    "rate",
    # a tariff other than tokens (billing/tariffs.py): quantity_tokens is the billed units in `unit`
    "unit",
    "language",
    "raw_tokens",
    "factor",
    "reference",  # the usage_digest and billed_events rows: what a tenant recomputes
)


class _Padded:
    """Every row as wide as the header (the summary rows leave the line columns empty)."""

    def __init__(self, out: io.StringIO) -> None:
        self._writer = csv.writer(out, lineterminator="\n")

    def writerow(self, row: list[object] | tuple[object, ...]) -> None:
        self._writer.writerow([*row, *[""] * (len(COLUMNS) - len(row))])


def to_csv(doc: Invoice | CreditNote) -> str:
    out = io.StringIO()
    writer = _Padded(out)
    writer.writerow(COLUMNS)
    number = doc.number or "DRAFT"
    for index, line in enumerate(doc.lines, 1):
        writer.writerow(
            [
                number,
                doc.kind,
                index,
                line.kind.value,
                line.model or "",
                line.token_type.value if line.token_type else "",
                line.tier or "",
                line.quantity_tokens,
                fmt(line.unit_price_per_million) if line.unit_price_per_million is not None else "",
                fmt(line.amount),
                doc.currency,
                "",
                "",
                line.unit or "",
                line.language or "" if line.unit else "",
                "" if line.raw_tokens is None else line.raw_tokens,
                "" if line.factor is None else fmt(line.factor),
            ]
        )
    writer.writerow(
        [number, doc.kind, "subtotal", "", "", "", "", "", "", fmt(doc.subtotal), doc.currency, "", ""]
    )
    for tax in doc.taxes:
        writer.writerow(
            [
                number,
                doc.kind,
                "tax",
                "",
                "",
                "",
                "",
                "",
                "",
                fmt(tax.amount),
                doc.currency,
                tax.treatment,
                fmt(tax.rate),
            ]
        )
        if tax.tax_currency and tax.tax_currency_amount is not None:
            writer.writerow(
                [
                    number,
                    doc.kind,
                    "tax_in_tax_currency",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    fmt(tax.tax_currency_amount),
                    tax.tax_currency,
                    tax.treatment,
                    fmt(tax.rate),
                ]
            )
    writer.writerow([number, doc.kind, "total", "", "", "", "", "", "", fmt(doc.total), doc.currency, "", ""])
    runs = ";".join(f"{a}-{b}" for a, b in doc.billed_events)
    trust = [["usage_digest", doc.usage_digest], *([["billed_events", runs]] if runs else [])]
    for label, value in trust:
        writer.writerow([number, doc.kind, label, *[""] * (len(COLUMNS) - 4), value])
    return out.getvalue()
