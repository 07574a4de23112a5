"""The billing engine: usage x price book x tax rules x FX -> invoice; invoice -> credit note.

Pure: no clock, no files, no database. The same inputs always give the same document (the order
of the usage rows does not matter). Steps of ``build_invoice``:

1. validate the period and the buyer's tax id (``billing.taxid``);
2. tax point = period end or issue date (the buyer country's policy); tax treatment on that date;
3. prices: the price book version covering the period in the buyer's currency + tenant contract;
   a period whose price changes inside it is prorated by event day (``usage_by_day``): lines per version;
4. usage lines: quantities summed per (model, token type), priced through the tiers, one line per
   tier used; amount = quantity x price / 1e6 rounded once (ROUND_HALF_UP, ISO minor units);
5. adjustment lines: ``adjustments`` (corrections, may be negative) priced with this period's prices;
   ``late`` supplies (late usage of earlier periods) priced with *their* period's prices, tiers and
   tax rule (billing/supplies.py), each line naming its period;
6. minimum commitment top-up when the usage lines sum below the minimum (adjustments excluded);
7. subtotal = sum(lines); one tax entry per (treatment, rate) of the supplies: tax = round(taxable x
   charged rate / 100); total = subtotal + taxes (EN 16931 BR-CO-10/13/15/17); tax restated in the
   tax currency where the rule wants it (SA: SAR) with the FX rate of each supply's date (FxUse);
8. the seller's ledger view (CN) with the net amount in CNY at each supply's ledger FX rate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from decimal import Decimal
from typing import TypeVar

from billing.documents import (
    BuyerSnapshot,
    CreditNote,
    DocumentStatus,
    Invoice,
    InvoiceLine,
    LineKind,
    SellerSnapshot,
)
from billing.errors import DocumentStateError, InvalidUsage
from billing.fx import FxTable
from billing.money import check_currency, div, fmt, mul, round_money
from billing.parties import Buyer, Seller
from billing.price_book import PER, PriceBook, PriceSpec, ResolvedPrices, Segment, TierMode, rate
from billing.supplies import (
    LateSupply,
    Supply,
    continued_segments,
    late_lines,
    ledger_of,
    spanned_lines,
    taxes_of,
)
from billing.tax import TaxRules
from billing.taxid import validate as validate_tax_id
from metering.events import TOKEN_TYPES, TokenType


@dataclass(frozen=True, slots=True)
class UsageQuantity:
    """Tokens of one model and token type, aggregated by the caller (optionally per origin/language)."""

    model: str
    token_type: TokenType
    quantity_tokens: int
    origin_country: str | None = None
    language: str | None = None
    batch: bool = False  # Batch API usage: priced at the batch discount, on its own lines
    # Under a tariff other than tokens (billing/tariffs.py) quantity_tokens is the billed units, in
    # `unit`, converted from `raw_tokens` with `factor`; such rows are priced on lines per language.
    unit: str | None = None
    raw_tokens: int | None = None
    factor: Decimal | None = None
    factor_source: str | None = None  # the language premium's date, tokenizer and source


def usage_digest(usage: Iterable[UsageQuantity]) -> str:
    """A stable sha256 of usage rows (order-independent), for ``build_invoice(usage_digest=...)``."""
    rows = sorted(
        f"{u.model}|{u.token_type.value}|{u.quantity_tokens}|{u.origin_country or ''}|{u.language or ''}"
        + ("|batch" if u.batch else "")  # live rows keep the digest they always had
        for u in usage
    )
    return "sha256:" + hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _line_amount(quantity: int, price: Decimal) -> Decimal:
    return div(mul(Decimal(quantity), price), Decimal(PER))


def _segments(spec: PriceSpec, before: int, quantity: int, total: int) -> list[Segment]:
    """`quantity` more units after `before` of a (model, token type) whose whole is `total`: the
    languages of a tariffed (model, token type) share one tier position."""
    if before == 0 and quantity == total:
        return rate(spec, quantity)
    if spec.mode is TierMode.VOLUME:
        [last] = rate(spec, total)
        return [Segment(last.tier, quantity, last.unit_price)]
    return continued_segments(spec, before, quantity)


LineKey = tuple[str, bool, TokenType, str, str, str]  # model, batch, token type, unit, language, premium row


def _grouped(rows: Sequence[UsageQuantity], kind: LineKind) -> dict[LineKey, list[object]]:
    """Quantities per line key: [units, raw tokens, factor, premium row]; the language (and the premium
    row it was billed with) only splits tariffed rows."""
    totals: dict[LineKey, list[object]] = {}
    for row in rows:
        if kind is LineKind.USAGE and row.quantity_tokens < 0:
            raise InvalidUsage(
                f"negative usage {row.quantity_tokens} for {row.model}/{row.token_type.value};"
                " corrections go in adjustments"
            )
        unit = row.unit or ""
        language = (row.language or "und") if unit else ""
        key = (row.model, row.batch, row.token_type, unit, language, row.factor_source or "")
        acc = totals.setdefault(key, [0, 0, row.factor, row.factor_source])
        acc[0] = int(str(acc[0])) + row.quantity_tokens
        acc[1] = int(str(acc[1])) + (row.raw_tokens if row.raw_tokens is not None else row.quantity_tokens)
    return totals


def _priced_lines(rows: Sequence[UsageQuantity], prices: ResolvedPrices, kind: LineKind) -> list[InvoiceLine]:
    totals = _grouped(rows, kind)
    order = {t: i for i, t in enumerate(TOKEN_TYPES)}
    whole: dict[tuple[str, bool, TokenType], int] = {}
    for (model, batch, token_type, _u, _l, _r), (units, _raw, _f, _s) in totals.items():
        whole[(model, batch, token_type)] = whole.get((model, batch, token_type), 0) + abs(int(str(units)))
    before: dict[tuple[str, bool, TokenType], int] = {}
    lines: list[InvoiceLine] = []
    for (model, batch, token_type, unit, language, _row), (units, raw, factor, source) in sorted(
        totals.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]], kv[0][3], kv[0][4], kv[0][5])
    ):
        quantity = int(str(units))
        if quantity == 0 and not unit:
            continue
        spec = prices.price(model, token_type)
        sign = -1 if quantity < 0 else 1
        group = (model, batch, token_type)
        done = before.get(group, 0)
        before[group] = done + abs(quantity)
        # Batch API usage: through the tiers on its own quantity, at the discounted price, own lines
        line_kind = LineKind.BATCH_USAGE if batch and kind is LineKind.USAGE else kind
        tariffed = (
            {
                "unit": unit,
                "language": language,
                "raw_tokens": sign * int(str(raw)),
                "factor": factor,
                "factor_source": source,
            }
            if unit
            else {}
        )
        for segment in _segments(spec, done, abs(quantity), whole[group]) or (
            [Segment(None, 0, spec.tiers[0].price)] if unit else []
        ):
            unit_price = prices.batch_price(segment.unit_price) if batch else segment.unit_price
            unrounded = _line_amount(sign * segment.quantity, unit_price)
            lines.append(
                InvoiceLine(
                    kind=line_kind,
                    model=model,
                    token_type=token_type,
                    quantity_tokens=sign * segment.quantity,
                    unit_price_per_million=unit_price,
                    amount=round_money(unrounded, prices.currency),
                    amount_unrounded=unrounded,
                    tier=segment.tier,
                    tier_mode=spec.mode.value,
                    **tariffed,  # type: ignore[arg-type]
                )
            )
    return lines


def _minimum_line(usage_lines: list[InvoiceLine], prices: ResolvedPrices) -> list[InvoiceLine]:
    if prices.minimum_commitment is None:
        return []
    minimum = round_money(prices.minimum_commitment, prices.currency)
    used = sum((line.amount for line in usage_lines), Decimal(0))
    if used >= minimum:
        return []
    top_up = minimum - used
    return [
        InvoiceLine(
            kind=LineKind.MINIMUM_COMMITMENT,
            model=None,
            token_type=None,
            quantity_tokens=0,
            unit_price_per_million=None,
            amount=top_up,
            amount_unrounded=top_up,
        )
    ]


def build_invoice(
    *,
    usage: Sequence[UsageQuantity],
    buyer: Buyer,
    seller: Seller,
    price_book: PriceBook,
    tax_rules: TaxRules,
    fx: FxTable,
    period_start: date,
    period_end: date,
    issue_date: date,
    adjustments: Sequence[UsageQuantity] = (),
    late: Sequence[LateSupply] = (),
    usage_by_day: Mapping[date, Mapping[tuple[str, TokenType], int]] | None = None,
    usage_digest: str,
) -> Invoice:
    """A draft invoice (no number) for one buyer and billing period.

    ``usage_by_day`` (the same tokens as ``usage``, per UTC day of the events) lets a period whose price
    changes inside it be prorated: lines per price book version (billing/supplies.py).
    """
    if period_end < period_start:
        raise InvalidUsage(f"period ends ({period_end}) before it starts ({period_start})")
    if issue_date < period_start:
        raise InvalidUsage(f"issue date {issue_date} is before the period start {period_start}")
    currency = check_currency(buyer.currency)
    country = buyer.billing_country.upper()
    tax_id = validate_tax_id(country, buyer.tax_id) if buyer.tax_id else None
    buyer = replace(buyer, billing_country=country, tax_id=tax_id, currency=currency)
    tax_point = tax_rules.tax_point(country, period_end=period_end, issue_date=issue_date)
    treatment = tax_rules.determine(buyer, seller, tax_point)

    def select(start: date, end: date) -> ResolvedPrices:
        return price_book.select(currency=currency, period_start=start, period_end=end, tenant_id=buyer.id)

    spans = price_book.spans(currency=currency, period_start=period_start, period_end=period_end)
    if len(spans) > 1 and usage_by_day is not None:
        usage_lines, used = spanned_lines(
            usage_by_day, spans, select, kind=LineKind.USAGE, period=None, billed_before={}
        )
        prices = replace(used[-1], version=", ".join(dict.fromkeys(p.version for p in used)))
    else:
        prices = select(period_start, period_end)
        usage_lines = _priced_lines(usage, prices, LineKind.USAGE)
    lines = usage_lines + _priced_lines(adjustments, prices, LineKind.ADJUSTMENT)
    lines += _minimum_line(usage_lines, prices)
    supplies = [Supply(period_start.strftime("%Y-%m"), tax_point, treatment, lines)]
    for supply in sorted(late, key=lambda s: s.period_start):
        point = tax_rules.tax_point(country, period_end=supply.period_end, issue_date=issue_date)
        parts = price_book.spans(
            currency=currency, period_start=supply.period_start, period_end=supply.period_end
        )
        if len(parts) > 1 and supply.by_day:
            late_part, _ = spanned_lines(
                supply.by_day,
                parts,
                select,
                kind=LineKind.ADJUSTMENT,
                period=supply.label,
                billed_before=supply.billed_before,
            )
        else:
            late_part = late_lines(supply, select(supply.period_start, supply.period_end))
        supplies.append(Supply(supply.label, point, tax_rules.determine(buyer, seller, point), late_part))
    lines = [line for s in supplies for line in s.lines]
    subtotal = sum((line.amount for line in lines), Decimal(0))
    if subtotal < 0:
        raise InvalidUsage(f"negative subtotal {fmt(subtotal)} {currency}: issue a credit note instead")

    taxes, tax_fx = taxes_of(supplies, currency, fx, issue_date)
    ledger, ledger_fx = ledger_of(
        supplies,
        currency,
        [tax_rules.seller_ledger(buyer, seller, s.tax_point) for s in supplies],
        tax_rules.ledger_currency,
        fx,
        issue_date,
    )
    return Invoice(
        number=None,
        status=DocumentStatus.DRAFT,
        issue_date=issue_date,
        due_date=issue_date + timedelta(days=seller.payment_terms_days),
        tax_point=tax_point,
        period_start=period_start,
        period_end=period_end,
        currency=currency,
        seller=SellerSnapshot(
            id=seller.id,
            name=seller.legal_name,
            local_name=seller.local_name,
            address_lines=seller.address_lines,
            city=seller.city,
            postal_code=seller.postal_code,
            country=seller.country,
            tax_id=seller.tax_id,
            vat_id=treatment.seller_vat_id,
            email=seller.email,
            bank={
                "bank_name": seller.bank.bank_name,
                "account_name": seller.bank.account_name,
                "account_number": seller.bank.account_number,
                "swift": seller.bank.swift,
            },
        ),
        buyer=BuyerSnapshot(
            id=buyer.id,
            name=buyer.name,
            billing_country=country,
            tax_id=tax_id,
            business=buyer.business,
            language=buyer.language.lower(),
        ),
        lines=tuple(lines),
        subtotal=subtotal,
        taxes=taxes,
        total=subtotal + sum((t.amount for t in taxes), Decimal(0)),
        fx=tuple(tax_fx + ledger_fx),
        usage_digest=usage_digest,
        price_book_version=prices.version,
        contract_id=prices.contract_id,
        tax_rule_id=treatment.rule_id,
        ledger=ledger,
    )


D = TypeVar("D", Invoice, CreditNote)


def finalize(document: D, number: str) -> D:
    """A copy with its number and status finalized (numbers come from the store's gapless series)."""
    if document.status is not DocumentStatus.DRAFT:
        raise DocumentStateError(
            f"only a draft can be finalized; {document.number} is {document.status.value}"
        )
    if not number.strip():
        raise DocumentStateError("a finalized document needs a number")
    return replace(document, number=number, status=DocumentStatus.FINALIZED)


def void(document: D) -> D:
    """A finalized document marked void (kept, never deleted; its number stays used)."""
    if document.status is not DocumentStatus.FINALIZED:
        raise DocumentStateError(f"only a finalized document can be voided; it is {document.status.value}")
    return replace(document, status=DocumentStatus.VOID)


def build_credit_note(invoice: Invoice, *, reason: str, issue_date: date) -> CreditNote:
    """A draft credit note reversing ``invoice`` exactly (same lines, tax and FX rates)."""
    if invoice.status is not DocumentStatus.FINALIZED or invoice.number is None:
        raise DocumentStateError("only a finalized invoice can be credited")
    if not reason.strip():
        raise DocumentStateError("a credit note needs a reason")
    if issue_date < invoice.issue_date:
        raise DocumentStateError(
            f"credit note date {issue_date} is before the invoice date {invoice.issue_date}"
        )
    return CreditNote(
        number=None,
        status=DocumentStatus.DRAFT,
        issue_date=issue_date,
        tax_point=invoice.tax_point,
        period_start=invoice.period_start,
        period_end=invoice.period_end,
        currency=invoice.currency,
        seller=invoice.seller,
        buyer=invoice.buyer,
        lines=invoice.lines,
        subtotal=invoice.subtotal,
        taxes=invoice.taxes,
        total=invoice.total,
        fx=invoice.fx,
        usage_digest=invoice.usage_digest,
        price_book_version=invoice.price_book_version,
        contract_id=invoice.contract_id,
        tax_rule_id=invoice.tax_rule_id,
        ledger=invoice.ledger,
        reason=reason,
        original_number=invoice.number,
        original_issue_date=invoice.issue_date,
    )
