"""Prices for money budgets: a small `Pricer` protocol and the billing price book behind it.

Budgets hold and settle with the highest unit price of each (model, token type) in the tenant's
price book version in force that day (or its contract): tiers depend on the month's total,
which only the invoice knows, so the budget never counts less than the invoice will charge. A model
with no price in the tenant's currency cannot be used under a money budget (403 model_not_priced),
never silently at zero.
"""

from __future__ import annotations

import logging
from datetime import date
from decimal import Decimal
from typing import Protocol

from billing.errors import BillingError
from billing.money import to_micro as to_micro
from billing.money import token_cost
from billing.price_book import PriceBook, ResolvedPrices
from billing.prices import PriceSource
from billing.tariffs import Converter
from metering.clock import utcnow
from metering.events import TokenType, UsageEvent

log = logging.getLogger("tokenport.limits")
MAX_CACHED = 10_000  # (tenant, currency, day) price lookups remembered; forgotten all at once when full


class PriceUnavailable(Exception):
    """No price for this model, token type and currency (the message says which)."""


class Pricer(Protocol):
    def price(
        self,
        model: str,
        token_type: TokenType,
        tokens: int | Decimal,
        currency: str,
        *,
        tenant_id: str | None = None,
        on: date | None = None,
    ) -> Decimal:
        """The price of `tokens` tokens in `currency` (major units, exact Decimal)."""
        ...


class StaticPricer:
    """Fixed prices per 1M tokens: {(model, token type): price}, one currency (tests, simple setups)."""

    def __init__(self, currency: str, per_million: dict[tuple[str, TokenType], Decimal]) -> None:
        self.currency = currency
        self.per_million = per_million

    def price(
        self,
        model: str,
        token_type: TokenType,
        tokens: int | Decimal,
        currency: str,
        *,
        tenant_id: str | None = None,
        on: date | None = None,
    ) -> Decimal:
        unit = self.per_million.get((model, token_type))
        if unit is None or currency != self.currency:
            raise PriceUnavailable(f"no {currency} price for {model} {token_type.value}")
        return token_cost(tokens, unit)


class PriceBookPricer:
    """The shared price source (billing/prices.py): the version covering the month, with tenant contracts."""

    def __init__(self, source: PriceSource) -> None:
        self._source = source
        self._book: PriceBook | None = None  # the book the cache was filled from
        self._cache: dict[tuple[str, str, date], ResolvedPrices] = {}

    def converter(self, tenant_id: str, currency: str) -> Converter | None:
        """The tenant's events as billed (its tariff: billing/tariffs.py), the same conversion as invoices."""
        try:
            return self._source.converter(tenant_id, currency)
        except BillingError:
            return None

    def price(
        self,
        model: str,
        token_type: TokenType,
        tokens: int | Decimal,
        currency: str,
        *,
        tenant_id: str | None = None,
        on: date | None = None,
    ) -> Decimal:
        day = on or utcnow().date()
        key = (tenant_id or "", currency, day)
        try:
            book = self._source.book()
            if book is not self._book or len(self._cache) > MAX_CACHED:  # refreshed source: prices may change
                self._book, self._cache = book, {}
            if key not in self._cache:  # the version in force that day (a price may change inside a month)
                self._cache[key] = book.select(
                    currency=currency, period_start=day, period_end=day, tenant_id=tenant_id or ""
                )
            spec = self._cache[key].price(model, token_type)
        except BillingError as exc:
            raise PriceUnavailable(str(exc)) from exc
        return token_cost(tokens, max(t.price for t in spec.tiers))


def cost_units(
    pricer: Pricer,
    model: str,
    currency: str,
    tenant_id: str,
    *,
    input_tokens: int | Decimal,
    cached_tokens: int | Decimal,
    output_tokens: int | Decimal,
    on: date | None = None,
) -> int:
    """Millionths of the currency for these token counts (raises PriceUnavailable)."""
    total = Decimal(0)
    for token_type, n in (
        (TokenType.INPUT, input_tokens),
        (TokenType.CACHED_INPUT, cached_tokens),
        (TokenType.OUTPUT, output_tokens),
    ):
        if n:
            try:
                total += pricer.price(model, token_type, n, currency, tenant_id=tenant_id, on=on)
            except PriceUnavailable:
                if token_type is not TokenType.INPUT:
                    raise
                # An embedding model is priced per `embedding_input` token only (its requests have no
                # other kind): its prompt tokens are priced so.
                total += pricer.price(
                    model, TokenType.EMBEDDING_INPUT, n, currency, tenant_id=tenant_id, on=on
                )
    return to_micro(total)


def billed_counts(
    pricer: Pricer | None, tenant_id: str, currency: str, event: UsageEvent
) -> tuple[int | Decimal, int | Decimal, int | Decimal]:
    """(input, cached, output) of an event in the units its invoice bills (billing/tariffs.py), exact:
    the tokens on a tokens tariff or without a price book."""
    convert = pricer.converter(tenant_id, currency) if isinstance(pricer, PriceBookPricer) else None
    units = convert(event) if convert is not None else None
    if units is None:
        return (
            event.prompt_tokens - event.cached_prompt_tokens,
            event.cached_prompt_tokens,
            event.completion_tokens,
        )
    got = {t: b.exact for t, b in units.items()}
    zero = Decimal(0)
    fresh = got.get(TokenType.INPUT, zero) + got.get(TokenType.EMBEDDING_INPUT, zero)
    return fresh, got.get(TokenType.CACHED_INPUT, zero), got.get(TokenType.OUTPUT, zero)
