"""Estimated spend at request time, for dashboards and alerts only.

Each metered event is priced with the tenant's price book (first tier of each price: tiers depend
on the month's total, which only the invoice knows). The counter is labelled an estimate; invoices
always come from the ledger through billing, never from Prometheus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from billing.errors import BillingError
from billing.price_book import PriceBook, ResolvedPrices, load
from metering.events import UsageEvent
from metering.metrics import Metrics
from metering.tenants import Tenant
from serving.dates import month_bounds

log = logging.getLogger("tokenport.spend")
PER_MILLION = Decimal(1_000_000)


class SpendEstimator:
    def __init__(self, book: PriceBook | None, metrics: Metrics, tenant: Callable[[str], Tenant | None]) -> None:
        self._book = book
        self._metrics = metrics
        self._tenant = tenant
        self._resolved: dict[tuple[str, str, str], ResolvedPrices | None] = {}

    @classmethod
    def from_file(cls, path: Path, metrics: Metrics, tenant: Callable[[str], Tenant | None]) -> SpendEstimator:
        book = None
        if path.is_file():
            try:
                book = load(path)
            except BillingError as exc:
                log.error("estimated spend disabled: %s", exc)
        return cls(book, metrics, tenant)

    def _prices(self, tenant: Tenant, event: UsageEvent) -> ResolvedPrices | None:
        start, end = month_bounds(event.started_at.date())
        key = (tenant.id, tenant.currency, start.isoformat())
        if key not in self._resolved:
            try:
                assert self._book is not None
                self._resolved[key] = self._book.select(currency=tenant.currency, period_start=start,
                                                        period_end=end, tenant_id=tenant.id)
            except BillingError as exc:
                log.warning("no estimated spend for tenant %s: %s", tenant.id, exc)
                self._resolved[key] = None
        return self._resolved[key]

    def observe(self, event: UsageEvent) -> None:
        if self._book is None:
            return
        tenant = self._tenant(event.tenant_id)
        if tenant is None:
            return
        prices = self._prices(tenant, event)
        if prices is None:
            return
        amount = Decimal(0)
        for token_type, n in event.tokens_by_type().items():
            if n:
                try:
                    amount += n * prices.price(event.model, token_type).tiers[0].price
                except BillingError:
                    return
        if amount:
            self._metrics.estimated_spend.labels(self._metrics.tenant_label(tenant.id), tenant.currency,
                                                 event.origin_country).inc(float(amount / PER_MILLION))
