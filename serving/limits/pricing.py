"""Prices for money budgets: a small `Pricer` protocol and the billing price book behind it.

Budgets hold and settle with the highest unit price of each (model, token type) in the tenant's
price book version for the current month (or its contract): tiers depend on the month's total,
which only the invoice knows, so the budget never counts less than the invoice will charge. A model
with no price in the tenant's currency cannot be used under a money budget (403 model_not_priced),
never silently at zero.
"""

from __future__ import annotations

import calendar
import logging
from datetime import UTC, date, datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Protocol

from metering.events import TokenType
from serving.limits.policy import MICRO

log = logging.getLogger("tokenport.limits")
PER_MILLION = Decimal(1_000_000)


class PriceUnavailable(Exception):
    """No price for this model, token type and currency (the message says which)."""


class Pricer(Protocol):
    def price(self, model: str, token_type: TokenType, tokens: int, currency: str, *,
              tenant_id: str | None = None, on: date | None = None) -> Decimal:
        """The price of `tokens` tokens in `currency` (major units, exact Decimal)."""
        ...


class StaticPricer:
    """Fixed prices per 1M tokens: {(model, token type): price}, one currency (tests, simple setups)."""

    def __init__(self, currency: str, per_million: dict[tuple[str, TokenType], Decimal]) -> None:
        self.currency = currency
        self.per_million = per_million

    def price(self, model: str, token_type: TokenType, tokens: int, currency: str, *,
              tenant_id: str | None = None, on: date | None = None) -> Decimal:
        unit = self.per_million.get((model, token_type))
        if unit is None or currency != self.currency:
            raise PriceUnavailable(f"no {currency} price for {model} {token_type.value}")
        return unit * tokens / PER_MILLION


class PriceBookPricer:
    """Adapter over billing.price_book: the version covering the current month, with tenant contracts."""

    def __init__(self, book: object) -> None:
        self._book = book
        self._cache: dict[tuple[str, str, date], object] = {}

    @classmethod
    def from_file(cls, path: Path) -> PriceBookPricer | None:
        if not path.is_file():
            return None
        try:
            from billing.price_book import load

            return cls(load(path))
        except Exception as exc:  # noqa: BLE001 - money budgets then refuse (fail closed)
            log.error("price book %s unusable for money budgets: %s", path, exc)
            return None

    def price(self, model: str, token_type: TokenType, tokens: int, currency: str, *,
              tenant_id: str | None = None, on: date | None = None) -> Decimal:
        from billing.errors import BillingError

        day = on or datetime.now(UTC).date()
        start = day.replace(day=1)
        end = day.replace(day=calendar.monthrange(day.year, day.month)[1])
        key = (tenant_id or "", currency, start)
        try:
            if key not in self._cache:
                self._cache[key] = self._book.select(  # type: ignore[attr-defined]
                    currency=currency, period_start=start, period_end=end, tenant_id=tenant_id or "")
            spec = self._cache[key].price(model, token_type)  # type: ignore[attr-defined]
        except BillingError as exc:
            raise PriceUnavailable(str(exc)) from exc
        unit: Decimal = max(t.price for t in spec.tiers)
        return unit * tokens / PER_MILLION


def to_micro(amount: Decimal) -> int:
    """Money in integer millionths, rounded up (a hold or a charge is never under-counted)."""
    return int((amount * MICRO).to_integral_value(rounding=ROUND_CEILING))


def cost_units(pricer: Pricer, model: str, currency: str, tenant_id: str, *, input_tokens: int,
               cached_tokens: int, output_tokens: int, on: date | None = None) -> int:
    """Millionths of the currency for these token counts (raises PriceUnavailable)."""
    total = Decimal(0)
    for token_type, n in ((TokenType.INPUT, input_tokens), (TokenType.CACHED_INPUT, cached_tokens),
                          (TokenType.OUTPUT, output_tokens)):
        if n:
            total += pricer.price(model, token_type, n, currency, tenant_id=tenant_id, on=on)
    return to_micro(total)
