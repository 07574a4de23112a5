"""Estimated spend at request time, for dashboards and alerts only.

Each metered event is priced with the tenant's price book (first tier of each price: tiers depend
on the month's total, which only the invoice knows). The counter is labelled an estimate; invoices
always come from the ledger through billing, never from Prometheus.

Prices are looked up once per (tenant, currency, month, model): an event costs a dict lookup, three
Decimal products and a counter increment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from pathlib import Path

from billing.errors import BillingError
from billing.price_book import PriceBook, ResolvedPrices, load
from metering.events import TokenType, UsageEvent
from metering.metrics import Metrics
from metering.tenants import Tenant
from serving.dates import month_bounds

log = logging.getLogger("tokenport.spend")
PER_MILLION = Decimal(1_000_000)
PRICED = (TokenType.INPUT, TokenType.CACHED_INPUT, TokenType.OUTPUT)  # the order of the counts in observe
MAX_CACHED_PRICES = 10_000  # (tenant, month, model) price lookups remembered; forgotten all at once when full


class SpendEstimator:
    def __init__(self, book: PriceBook | None, metrics: Metrics, tenant: Callable[[str], Tenant | None]) -> None:
        self._book = book
        self._metrics = metrics
        self._tenant = tenant
        # (tenant, currency, year, month) -> the month's prices; None: no price book covers it.
        self._resolved: dict[tuple[str, str, int, int], ResolvedPrices | None] = {}
        # (tenant, currency, year, month, model) -> first-tier price per PRICED type (None: not priced),
        # or None when the month has no prices.
        self._units: dict[tuple[str, str, int, int, str], tuple[Decimal | None, ...] | None] = {}

    @classmethod
    def from_file(cls, path: Path, metrics: Metrics, tenant: Callable[[str], Tenant | None]) -> SpendEstimator:
        book = None
        if path.is_file():
            try:
                book = load(path)
            except BillingError as exc:
                log.error("estimated spend disabled: %s", exc)
        return cls(book, metrics, tenant)

    def _prices(self, tenant: Tenant, year: int, month: int) -> ResolvedPrices | None:
        key = (tenant.id, tenant.currency, year, month)
        if key not in self._resolved:
            start, end = month_bounds(date(year, month, 1))
            try:
                assert self._book is not None
                self._resolved[key] = self._book.select(currency=tenant.currency, period_start=start,
                                                        period_end=end, tenant_id=tenant.id)
            except BillingError as exc:
                log.warning("no estimated spend for tenant %s: %s", tenant.id, exc)
                self._resolved[key] = None
        return self._resolved[key]

    def _unit_prices(self, tenant: Tenant, year: int, month: int, model: str) -> tuple[Decimal | None, ...] | None:
        prices = self._prices(tenant, year, month)
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
        if self._book is None:
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
            units = self._units[key] = self._unit_prices(tenant, started.year, started.month, event.model)
        if units is None:
            return
        amount = Decimal(0)
        for unit, n in zip(units, (event.input_tokens, event.cached_prompt_tokens, event.completion_tokens),
                           strict=True):
            if n:
                if unit is None:  # a model without a price for this token type: no estimate
                    return
                amount += n * unit
        if amount:
            metrics = self._metrics
            metrics.child(metrics.estimated_spend, metrics.tenant_label(tenant.id), tenant.currency,
                          event.origin_country).inc(float(amount / PER_MILLION))
