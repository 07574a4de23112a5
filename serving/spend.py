"""Estimated spend at request time, for dashboards and alerts only.

Each metered event is priced with the application's one price source (billing/prices.py, shared
with budgets and invoices; first tier of each price: tiers depend on the month's total, which only
the invoice knows). Amounts stay exact Decimals; the float is made at the counter only
(`billing.money.metric_value`). The counter is labelled an estimate; invoices
always come from the ledger through billing, never from Prometheus.

Prices are looked up once per (tenant, currency, month, model) -- per part of the month when a price
changes inside it, each event priced by the version in force that day: an event costs two dict
lookups, three Decimal products and a counter increment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date
from decimal import Decimal

from billing.errors import BillingError
from billing.money import metric_value, token_cost
from billing.price_book import PriceBook, ResolvedPrices
from billing.prices import PriceSource
from metering.clock import Period
from metering.events import TOKEN_TYPES, TokenType, UsageEvent
from metering.metrics import Metrics
from metering.tenants import Tenant

log = logging.getLogger("tokenport.spend")
PRICED = TOKEN_TYPES  # the order of the unit prices cached per model
MAX_CACHED_PRICES = 10_000  # (tenant, month, model) price lookups remembered; forgotten all at once when full


class SpendEstimator:
    def __init__(
        self, prices: PriceSource | None, metrics: Metrics, tenant: Callable[[str], Tenant | None]
    ) -> None:
        self._prices = prices
        self._book: PriceBook | None = None  # the book the caches were filled from
        self._metrics = metrics
        self._tenant = tenant
        # (currency, year, month) -> the parts of the month each priced by one version (one, unless the
        # price changes inside the month); () when no version covers the whole month.
        self._spans: dict[tuple[str, int, int], tuple[tuple[date, date], ...]] = {}
        # (tenant, currency, first day of the part) -> its prices; None: no price book covers it.
        self._resolved: dict[tuple[str, str, date], ResolvedPrices | None] = {}
        # (tenant, currency, first day of the part, model) -> first-tier price per PRICED type (None: not
        # priced), or None when the part has no prices.
        self._units: dict[tuple[str, str, date, str], tuple[Decimal | None, ...] | None] = {}

    def _current_book(self) -> PriceBook | None:
        """The source's book; the caches are dropped when the source was refreshed to a new one."""
        if self._prices is None:
            return None
        try:
            book = self._prices.book()
        except BillingError:
            return None
        if book is not self._book:
            self._book = book
            self._spans.clear()
            self._resolved.clear()
            self._units.clear()
        return book

    def _span(self, book: PriceBook, currency: str, day: date) -> tuple[date, date] | None:
        """The part of the day's month priced by the version in force that day."""
        key = (currency, day.year, day.month)
        spans = self._spans.get(key)
        if spans is None:
            month = Period(day.year, day.month)
            try:
                spans = tuple(book.spans(currency=currency, period_start=month.start, period_end=month.end))
            except BillingError as exc:
                log.warning("no estimated spend in %s for %s: %s", currency, month, exc)
                spans = ()
            self._spans[key] = spans
        return next(((a, b) for a, b in spans if a <= day <= b), None)

    def _part_prices(self, book: PriceBook, tenant: Tenant, span: tuple[date, date]) -> ResolvedPrices | None:
        key = (tenant.id, tenant.currency, span[0])
        if key not in self._resolved:
            try:
                self._resolved[key] = book.select(
                    currency=tenant.currency, period_start=span[0], period_end=span[1], tenant_id=tenant.id
                )
            except BillingError as exc:
                log.warning("no estimated spend for tenant %s: %s", tenant.id, exc)
                self._resolved[key] = None
        return self._resolved[key]

    def _unit_prices(
        self, book: PriceBook, tenant: Tenant, span: tuple[date, date], model: str
    ) -> tuple[Decimal | None, ...] | None:
        prices = self._part_prices(book, tenant, span)
        if prices is None:
            return None
        units: list[Decimal | None] = []
        for token_type in PRICED:
            try:
                units.append(prices.price(model, token_type).tiers[0].price)
            except BillingError:
                units.append(None)
        return tuple(units)

    def _billed(self, tenant: Tenant, event: UsageEvent) -> dict[TokenType, int]:
        """The event's units per token type as its invoice bills them (tokens on a tokens tariff)."""
        if self._prices is None:
            return event.tokens_by_type()
        convert = self._prices.converter(tenant.id, tenant.currency)  # cached by the price source
        units = convert(event)
        return event.tokens_by_type() if units is None else {t: b.units for t, b in units.items()}

    def observe(self, event: UsageEvent) -> None:
        book = self._current_book()
        if book is None:
            return
        tenant = self._tenant(event.tenant_id)
        if tenant is None:
            return
        span = self._span(book, tenant.currency, event.started_at.date())
        if span is None:
            return
        key = (tenant.id, tenant.currency, span[0], event.model)
        try:
            units = self._units[key]
        except KeyError:
            if len(self._units) >= MAX_CACHED_PRICES:
                self._units.clear()
            units = self._units[key] = self._unit_prices(book, tenant, span, event.model)
        if units is None:
            return
        amount = Decimal(0)
        counts = self._billed(tenant, event)
        for unit, token_type in zip(units, PRICED, strict=True):
            n = counts.get(token_type, 0)
            if n:
                if unit is None:  # a model without a price for this token type: no estimate
                    return
                amount += token_cost(n, unit)
        if amount:
            metrics = self._metrics
            metrics.child(
                metrics.estimated_spend,
                metrics.tenant_label(tenant.id),
                tenant.currency,
                event.origin_country,
            ).inc(metric_value(amount))
