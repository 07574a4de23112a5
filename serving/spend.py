"""Estimated spend at request time, for dashboards and alerts only.

Each metered event is priced with the application's one price source (billing/prices.py, shared
with budgets and invoices; first tier of each price: tiers depend on the month's total, which only
the invoice knows). Amounts stay exact Decimals; the float is made at the counter only
(`billing.money.metric_value`). The counter is labelled an estimate; invoices
always come from the ledger through billing, never from Prometheus.

Prices are looked up once per (tenant, currency, month, model): an event costs a dict lookup, three
Decimal products and a counter increment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from billing.errors import BillingError
from billing.money import metric_value, token_cost
from billing.price_book import PriceBook, ResolvedPrices
from billing.prices import PriceSource, load_price_source
from metering.clock import Period
from metering.events import TOKEN_TYPES, UsageEvent
from metering.metrics import Metrics
from metering.tenants import Tenant

log = logging.getLogger("tokenport.spend")
PRICED = TOKEN_TYPES  # the order of the unit prices cached per model
MAX_CACHED_PRICES = 10_000  # (tenant, month, model) price lookups remembered; forgotten all at once when full


class SpendEstimator:
    def __init__(self, prices: PriceSource | None, metrics: Metrics,
                 tenant: Callable[[str], Tenant | None]) -> None:
        self._prices = prices
        self._book: PriceBook | None = None  # the book the caches were filled from
        self._metrics = metrics
        self._tenant = tenant
        # (tenant, currency, year, month) -> the month's prices; None: no price book covers it.
        self._resolved: dict[tuple[str, str, int, int], ResolvedPrices | None] = {}
        # (tenant, currency, year, month, model) -> first-tier price per PRICED type (None: not priced),
        # or None when the month has no prices.
        self._units: dict[tuple[str, str, int, int, str], tuple[Decimal | None, ...] | None] = {}

    @classmethod
    def from_file(cls, path: Path, metrics: Metrics, tenant: Callable[[str], Tenant | None]) -> SpendEstimator:
        """Transitional, until the wiring hands over the application's PriceSource."""
        source = load_price_source(path) if path.is_file() else None
        if source is not None and not source.available:
            log.error("estimated spend disabled: %s", source.error)
        return cls(source, metrics, tenant)

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
            self._resolved.clear()
            self._units.clear()
        return book

    def _month_prices(self, book: PriceBook, tenant: Tenant, year: int, month: int) -> ResolvedPrices | None:
        key = (tenant.id, tenant.currency, year, month)
        if key not in self._resolved:
            period = Period(year, month)
            try:
                self._resolved[key] = book.select(currency=tenant.currency, period_start=period.start,
                                                  period_end=period.end, tenant_id=tenant.id)
            except BillingError as exc:
                log.warning("no estimated spend for tenant %s: %s", tenant.id, exc)
                self._resolved[key] = None
        return self._resolved[key]

    def _unit_prices(self, book: PriceBook, tenant: Tenant, year: int, month: int,
                     model: str) -> tuple[Decimal | None, ...] | None:
        prices = self._month_prices(book, tenant, year, month)
        if prices is None:
            return None
        units: list[Decimal | None] = []
        for token_type in PRICED:
            try:
                units.append(prices.price(model, token_type).tiers[0].price)
            except BillingError:
                units.append(None)
        return tuple(units)

    def observe(self, event: UsageEvent) -> None:
        book = self._current_book()
        if book is None:
            return
        tenant = self._tenant(event.tenant_id)
        if tenant is None:
            return
        started = event.started_at
        key = (tenant.id, tenant.currency, started.year, started.month, event.model)
        try:
            units = self._units[key]
        except KeyError:
            if len(self._units) >= MAX_CACHED_PRICES:
                self._units.clear()
            units = self._units[key] = self._unit_prices(book, tenant, started.year, started.month, event.model)
        if units is None:
            return
        amount = Decimal(0)
        counts = event.tokens_by_type()
        for unit, token_type in zip(units, PRICED, strict=True):
            n = counts.get(token_type, 0)
            if n:
                if unit is None:  # a model without a price for this token type: no estimate
                    return
                amount += token_cost(n, unit)
        if amount:
            metrics = self._metrics
            metrics.child(metrics.estimated_spend, metrics.tenant_label(tenant.id), tenant.currency,
                          event.origin_country).inc(metric_value(amount))
