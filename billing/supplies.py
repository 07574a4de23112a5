"""Late usage as its own supply: priced with the rules of the period it belongs to.

A late event of an earlier period Q (found after Q's invoice was issued) is billed on a later
invoice as adjustment lines that name Q, priced with:

* Q's price book version and contract (``price_book.select`` over Q);
* Q's tier position: the tiers continue from the tokens of Q already invoiced (``billed_before``),
  so 45M late output tokens of a tenant who had 50M in Q are priced where 50M left off. Graduated
  tiers price each part by the tier it falls in; a volume price is the tier of Q's new total (the
  tokens already invoiced are not re-priced);
* Q's tax rule at Q's tax point, and the FX rates of that date (`taxes_of` groups the taxes, one entry
  per treatment and rate, listing the periods it covers; `ledger_of` converts each supply at its own date).

A period whose price changes inside it is prorated the same way (`spanned_lines`): the usage of each
part of the period is priced by the version in force then, the tiers running on through the period.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from decimal import Decimal

from billing.documents import AppliedTax, FxUse, InvoiceLine, LedgerView, LineKind
from billing.errors import InvalidUsage
from billing.fx import FxRate, FxTable, fx_date
from billing.money import div, mul, round_money
from billing.price_book import PER, PriceSpec, ResolvedPrices, Segment, TierMode, rate
from billing.tax import TaxTreatment
from metering.events import TOKEN_TYPES, TokenType

HUNDRED = Decimal(100)


@dataclass(frozen=True, slots=True)
class LateSupply:
    """Late usage of one earlier period (quantities as ``UsageQuantity`` rows, summed per model and type)."""

    period_start: date
    period_end: date
    quantities: Mapping[tuple[str, TokenType], int]
    billed_before: Mapping[tuple[str, TokenType], int] = field(default_factory=dict)
    by_day: Mapping[date, Mapping[tuple[str, TokenType], int]] = field(default_factory=dict)  # for proration

    @property
    def label(self) -> str:
        return self.period_start.strftime("%Y-%m")


def continued_segments(spec: PriceSpec, before: int, quantity: int) -> list[Segment]:
    """The segments of `quantity` more tokens when `before` tokens of the period are already priced."""
    if quantity <= 0:
        return []
    if spec.mode is TierMode.VOLUME:
        [last] = rate(spec, before + quantity)
        return [Segment(last.tier, quantity, last.unit_price)]
    done = {s.tier: s.quantity for s in rate(spec, before)}
    out = []
    for s in rate(spec, before + quantity):
        extra = s.quantity - done.get(s.tier, 0)
        if extra > 0:
            out.append(Segment(s.tier, extra, s.unit_price))
    return out


Quantities = Mapping[tuple[str, TokenType], int]
Select = Callable[[date, date], ResolvedPrices]


def late_lines(supply: LateSupply, prices: ResolvedPrices) -> list[InvoiceLine]:
    """Adjustment lines of one late supply priced by one version, naming its period."""
    return _lines(
        supply.quantities, prices, dict(supply.billed_before), LineKind.ADJUSTMENT, supply.label, None
    )


def spanned_lines(
    by_day: Mapping[date, Quantities],
    spans: Sequence[tuple[date, date]],
    select: Select,
    *,
    kind: LineKind,
    period: str | None,
    billed_before: Quantities,
) -> tuple[list[InvoiceLine], list[ResolvedPrices]]:
    """Usage of a period whose price changes inside it, prorated by event day: lines per price book version.

    The tiers run on through the period: each part continues from the tokens of the parts before it.
    """
    before = dict(billed_before)
    lines: list[InvoiceLine] = []
    used: list[ResolvedPrices] = []
    for start, end in spans:
        prices = select(start, end)
        used.append(prices)
        part: dict[tuple[str, TokenType], int] = {}
        for day, tokens in by_day.items():
            if start <= day <= end:
                for key, n in tokens.items():
                    part[key] = part.get(key, 0) + n
        lines += _lines(part, prices, before, kind, period, prices.version)
    return lines, used


def _lines(
    quantities: Quantities,
    prices: ResolvedPrices,
    before: dict[tuple[str, TokenType], int],
    kind: LineKind,
    period: str | None,
    version: str | None,
) -> list[InvoiceLine]:
    order = {t: i for i, t in enumerate(TOKEN_TYPES)}
    lines: list[InvoiceLine] = []
    for (model, token_type), quantity in sorted(
        quantities.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])
    ):
        if quantity < 0:
            raise InvalidUsage(f"negative usage {quantity} for {model}/{token_type.value}")
        spec = prices.price(model, token_type)
        for segment in continued_segments(spec, before.get((model, token_type), 0), quantity):
            unrounded = div(mul(Decimal(segment.quantity), segment.unit_price), Decimal(PER))
            lines.append(
                InvoiceLine(
                    kind=kind,
                    model=model,
                    token_type=token_type,
                    quantity_tokens=segment.quantity,
                    unit_price_per_million=segment.unit_price,
                    amount=round_money(unrounded, prices.currency),
                    amount_unrounded=unrounded,
                    tier=segment.tier,
                    tier_mode=spec.mode.value,
                    period=period,
                    price_book_version=version,
                )
            )
        before[(model, token_type)] = before.get((model, token_type), 0) + quantity
    return lines


def summed(rows: Sequence[tuple[str, TokenType, int]]) -> dict[tuple[str, TokenType], int]:
    out: dict[tuple[str, TokenType], int] = {}
    for model, token_type, n in rows:
        out[(model, token_type)] = out.get((model, token_type), 0) + n
    return out


# --- taxes and the seller's ledger, per supply ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class Supply:
    """One taxable supply of the invoice: this period's lines, or one late period's."""

    period: str
    tax_point: date
    treatment: TaxTreatment
    lines: list[InvoiceLine]

    @property
    def amount(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal(0))


def _fx_use(currency: str, used: FxRate, to: str, purpose: str) -> FxUse:
    return FxUse(
        from_currency=currency,
        to_currency=to,
        rate=used.rate,
        source=used.source,
        date=used.date,
        purpose=purpose,
    )


def taxes_of(
    supplies: Sequence[Supply], currency: str, fx: FxTable, issue_date: date
) -> tuple[tuple[AppliedTax, ...], list[FxUse]]:
    """One tax entry per (treatment, rates, tax currency): the first supply always has one, late ones when
    they carry lines. Each supply's tax-currency base uses the FX rate of its own date."""
    groups: dict[tuple[str, Decimal, Decimal | None, str | None], list[Supply]] = {}
    for i, supply in enumerate(supplies):
        if i and not supply.lines:
            continue
        t = supply.treatment
        groups.setdefault((t.treatment.value, t.charged_rate, t.rate, t.tax_currency), []).append(supply)
    taxes: list[AppliedTax] = []
    uses: list[FxUse] = []
    for group in groups.values():
        treatment = group[0].treatment
        taxable = sum((s.amount for s in group), Decimal(0))
        exact = div(mul(taxable, treatment.charged_rate), HUNDRED)
        periods = tuple(s.period for s in group) if len(supplies) > 1 else ()
        tax = AppliedTax(
            treatment=treatment.treatment.value,
            rate=treatment.charged_rate,
            statutory_rate=treatment.rate,
            taxable_amount=taxable,
            amount=round_money(exact, currency),
            amount_unrounded=exact,
            currency=currency,
            note=treatment.text("en"),
            wording=treatment.wording,
            periods=periods,
        )
        if treatment.tax_currency is not None and treatment.tax_currency != currency:
            local = Decimal(0)
            for s in group:
                day = fx_date(s.treatment.fx_date_rule, tax_point=s.tax_point, issue_date=issue_date)
                used = fx.rate(currency, treatment.tax_currency, day)
                local += mul(s.amount, used.rate)
                if (use := _fx_use(currency, used, used.quote, "tax_currency")) not in uses:
                    uses.append(use)
            tax = replace(
                tax,
                tax_currency=treatment.tax_currency,
                tax_currency_taxable_amount=round_money(local, treatment.tax_currency),
                tax_currency_amount=round_money(
                    div(mul(local, treatment.charged_rate), HUNDRED), treatment.tax_currency
                ),
            )
        taxes.append(tax)
    return tuple(taxes), uses


def ledger_of(
    supplies: Sequence[Supply],
    currency: str,
    treatments: Sequence[TaxTreatment],
    ledger_currency: str,
    fx: FxTable,
    issue_date: date,
) -> tuple[LedgerView, list[FxUse]]:
    """The seller's books: the net amount in the ledger currency, each supply at the rate of its own date."""
    uses: list[FxUse] = []
    net = sum((s.amount for s in supplies), Decimal(0))
    if currency != ledger_currency:
        net = Decimal(0)
        for i, (supply, treatment) in enumerate(zip(supplies, treatments, strict=True)):
            if i and not supply.lines:
                continue
            day = fx_date(treatment.fx_date_rule, tax_point=supply.tax_point, issue_date=issue_date)
            used = fx.rate(currency, ledger_currency, day)
            net += round_money(mul(supply.amount, used.rate), ledger_currency)
            if (use := _fx_use(currency, used, ledger_currency, "ledger")) not in uses:
                uses.append(use)
    first = treatments[0]
    view = LedgerView(
        treatment=first.treatment.value,
        rule_id=first.rule_id,
        currency=ledger_currency,
        net_amount=net,
        note=first.text("en"),
    )
    return view, uses
