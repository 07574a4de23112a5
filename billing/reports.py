"""Export reports: token export volume and revenue by destination, tenant, model or language. Pure.

Rated rows come from finalized documents and the usage they billed:

* ``rated_rows(invoice, usage, adjustments)`` splits each (model, token type) revenue of the invoice
  over the usage rows (origin country, language) in proportion to their tokens; the minimum
  commitment top-up is a row without model or origin ("unattributed"). The CNY revenue splits the
  invoice's recorded ledger amount (``invoice.ledger.net_amount``, recorded FX rate) the same way,
  so rows add up exactly to the invoice.
* ``credit_rows(credit_note, rows)`` negates an invoice's rows for the credit note reversing it.

Splits round each share once (ROUND_HALF_UP) and give the rounding difference to the largest share.
Revenue is net of tax. ``period`` is the billing period's month (YYYY-MM of ``period_start``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from decimal import Decimal
from typing import Any

from billing.documents import CreditNote, Invoice, LineKind
from billing.engine import UsageQuantity
from billing.errors import InvalidUsage
from billing.money import div, mul, round_money
from metering.events import TokenType

UNATTRIBUTED = "unattributed"


class GroupBy(enum.StrEnum):
    COUNTRY = "country"  # origin_country of the usage: the export destination
    BUYER_COUNTRY = "buyer_country"  # the tenant's billing_country: the buyer's residence (CN export filing)
    TENANT = "tenant"
    MODEL = "model"
    LANGUAGE = "language"


@dataclass(frozen=True, slots=True)
class RatedRow:
    period: str
    document_number: str
    tenant_id: str
    billing_country: str
    origin_country: str | None
    language: str | None
    model: str | None
    token_type: TokenType | None
    adjustment: bool
    quantity_tokens: int
    revenue: Decimal  # net of tax, document currency; negative for credit notes
    currency: str
    revenue_cny: Decimal  # share of the invoice's ledger amount (recorded FX rate)
    cny_rate: Decimal
    fx_source: str
    fx_date: date | None


@dataclass(frozen=True, slots=True)
class CurrencyShare:
    """The part of a group invoiced in one currency: these add up to the group, with no double count."""

    currency: str
    quantity_tokens: int
    revenue: Decimal
    revenue_cny: Decimal
    documents: int


@dataclass(frozen=True, slots=True)
class ExportGroup:
    key: str
    quantity_tokens: int
    revenue_cny: Decimal
    revenue_by_currency: tuple[tuple[str, Decimal], ...]
    documents: int
    shares: tuple[CurrencyShare, ...] = ()


@dataclass(frozen=True, slots=True)
class ExportReport:
    period: str
    by: GroupBy
    groups: tuple[ExportGroup, ...]
    quantity_tokens: int
    revenue_cny: Decimal


def split(total: Decimal, weights: Sequence[Decimal], currency: str) -> list[Decimal]:
    """``total`` split in proportion to ``weights``, each share rounded, summing exactly to ``total``."""
    if not weights:
        return []
    weight_sum = sum(weights, Decimal(0))
    if weight_sum == 0:
        shares = [Decimal(0)] * len(weights)
    else:
        shares = [round_money(div(mul(total, w), weight_sum), currency) for w in weights]
    largest = max(range(len(weights)), key=lambda i: (abs(weights[i]), -i))
    shares[largest] += total - sum(shares, Decimal(0))
    return shares


def rated_rows(
    invoice: Invoice, usage: Sequence[UsageQuantity], adjustments: Sequence[UsageQuantity] = ()
) -> list[RatedRow]:
    """Rows of a finalized invoice (``usage`` / ``adjustments`` as given to ``build_invoice``)."""
    if invoice.number is None:
        raise InvalidUsage("report rows are made from finalized invoices only")
    ledger_fx = next((f for f in invoice.fx if f.purpose == "ledger"), None)
    rate = ledger_fx.rate if ledger_fx else Decimal(1)
    base = RatedRow(
        period=invoice.period_start.strftime("%Y-%m"),
        document_number=invoice.number,
        tenant_id=invoice.buyer.id,
        billing_country=invoice.buyer.billing_country,
        origin_country=None,
        language=None,
        model=None,
        token_type=None,
        adjustment=False,
        quantity_tokens=0,
        revenue=Decimal(0),
        currency=invoice.currency,
        revenue_cny=Decimal(0),
        cny_rate=rate,
        fx_source=ledger_fx.source if ledger_fx else "identity",
        fx_date=ledger_fx.date if ledger_fx else None,
    )
    rows: list[RatedRow] = []
    live = [u for u in usage if not u.batch]
    batch = [u for u in usage if u.batch]  # Batch API usage has lines of its own (LineKind.BATCH_USAGE)
    for kind, source in (
        (LineKind.USAGE, live),
        (LineKind.BATCH_USAGE, batch),
        (LineKind.ADJUSTMENT, adjustments),
    ):
        revenue: dict[tuple[str, TokenType], tuple[Decimal, int]] = {}
        for line in invoice.lines:
            if line.kind is kind and line.model is not None and line.token_type is not None:
                amount, tokens = revenue.get((line.model, line.token_type), (Decimal(0), 0))
                # a tariffed line bills units (english-equivalent tokens, characters): its raw tokens
                # are what the usage rows hold
                n = line.raw_tokens if line.unit and line.raw_tokens is not None else line.quantity_tokens
                revenue[(line.model, line.token_type)] = (amount + line.amount, tokens + n)
        for (model, token_type), (amount, tokens) in revenue.items():
            parts = [
                u for u in source if (u.model, u.token_type) == (model, token_type) and u.quantity_tokens
            ]
            if sum(u.quantity_tokens for u in parts) != tokens:
                raise InvalidUsage(
                    f"{kind.value} rows for {model}/{token_type.value} do not match invoice"
                    f" {invoice.number}: pass the usage it was built from"
                )
            shares = split(amount, [Decimal(u.quantity_tokens) for u in parts], invoice.currency)
            rows += [
                replace(
                    base,
                    origin_country=u.origin_country,
                    language=u.language,
                    model=model,
                    token_type=token_type,
                    adjustment=kind is LineKind.ADJUSTMENT,
                    quantity_tokens=u.quantity_tokens,
                    revenue=share,
                )
                for u, share in zip(parts, shares, strict=True)
            ]
    for line in invoice.lines:
        if line.kind is LineKind.MINIMUM_COMMITMENT:
            rows.append(replace(base, revenue=line.amount))
    cny = split(invoice.ledger.net_amount, [r.revenue for r in rows], invoice.ledger.currency)
    return [replace(r, revenue_cny=c) for r, c in zip(rows, cny, strict=True)]


def credit_rows(credit_note: CreditNote, invoice_rows: Iterable[RatedRow]) -> list[RatedRow]:
    """The rows of a credit note: the credited invoice's rows with revenue negated."""
    if credit_note.number is None:
        raise InvalidUsage("report rows are made from finalized credit notes only")
    return [
        replace(
            r,
            document_number=credit_note.number,
            quantity_tokens=-r.quantity_tokens,
            revenue=-r.revenue,
            revenue_cny=-r.revenue_cny,
        )
        for r in invoice_rows
        if r.document_number == credit_note.original_number
    ]


def _key(row: RatedRow, by: GroupBy) -> str:
    value = {
        GroupBy.COUNTRY: row.origin_country,
        GroupBy.BUYER_COUNTRY: row.billing_country,
        GroupBy.TENANT: row.tenant_id,
        GroupBy.MODEL: row.model,
        GroupBy.LANGUAGE: row.language,
    }[by]
    return value or UNATTRIBUTED


def aggregate_exports(rows: Iterable[RatedRow], *, period: str, by: GroupBy | str) -> ExportReport:
    """Totals per group for one month (``YYYY-MM``), largest CNY revenue first."""
    group_by = GroupBy(by)
    tokens: dict[str, int] = {}
    cny: dict[str, Decimal] = {}
    by_currency: dict[str, dict[str, Decimal]] = {}
    documents: dict[str, set[str]] = {}
    shares: dict[tuple[str, str], list[Any]] = {}  # (group, currency) -> tokens, revenue, cny, documents
    for row in rows:
        if row.period != period:
            continue
        key = _key(row, group_by)
        share = shares.setdefault((key, row.currency), [0, Decimal(0), Decimal(0), set()])
        share[0] += row.quantity_tokens
        share[1] += row.revenue
        share[2] += row.revenue_cny
        share[3].add(row.document_number)
        tokens[key] = tokens.get(key, 0) + row.quantity_tokens
        cny[key] = cny.get(key, Decimal(0)) + row.revenue_cny
        money = by_currency.setdefault(key, {})
        money[row.currency] = money.get(row.currency, Decimal(0)) + row.revenue
        documents.setdefault(key, set()).add(row.document_number)
    groups = tuple(
        sorted(
            (
                ExportGroup(
                    k,
                    tokens[k],
                    cny[k],
                    tuple(sorted(by_currency[k].items())),
                    len(documents[k]),
                    tuple(
                        CurrencyShare(c, int(v[0]), v[1], v[2], len(v[3]))
                        for (g, c), v in sorted(shares.items())
                        if g == k
                    ),
                )
                for k in tokens
            ),
            key=lambda g: (-g.revenue_cny, g.key),
        )
    )
    return ExportReport(period, group_by, groups, sum(tokens.values()), sum(cny.values(), Decimal(0)))
