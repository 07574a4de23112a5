"""Late usage as its own supply: priced with the rules of the period it belongs to.

A late event of an earlier period Q (found after Q's invoice was issued) is billed on a later
invoice as adjustment lines that name Q, priced with:

* Q's price book version and contract (``price_book.select`` over Q);
* Q's tier position: the tiers continue from the tokens of Q already invoiced (``billed_before``),
  so 45M late output tokens of a tenant who had 50M in Q are priced where 50M left off. Graduated
  tiers price each part by the tier it falls in; a volume price is the tier of Q's new total (the
  tokens already invoiced are not re-priced);
* Q's tax rule at Q's tax point, and the FX rates of that date (billing/engine.py groups the taxes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

from billing.documents import InvoiceLine, LineKind
from billing.errors import InvalidUsage
from billing.money import div, mul, round_money
from billing.price_book import PER, PriceSpec, ResolvedPrices, Segment, TierMode, rate
from metering.events import TOKEN_TYPES, TokenType


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
    return _lines(supply.quantities, prices, dict(supply.billed_before), LineKind.ADJUSTMENT, supply.label, None)


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
    for (model, token_type), quantity in sorted(quantities.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
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
