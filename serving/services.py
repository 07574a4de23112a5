"""The stores and application services of one process, built once from the settings.

The gateway (serving/app.py) and every CLI command (serving/cli/) open them here, so both run the
same services over the same database: accounts (tenants, keys, limits), the audit log and billing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

from sqlalchemy.engine import Engine

from billing.prices import PriceSource, load_price_source
from billing.service import BillingService
from billing.store import BillingStore
from metering.db import make_engine
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from serving import db_schema
from serving.accounts import Accounts
from serving.audit import Auditor
from serving.audit_store import AuditStore
from serving.limits.store import LimitsStore
from serving.settings import Settings


@dataclass(frozen=True)
class Stores:
    settings: Settings
    engine: Engine
    tenants: TenantStore
    usage: UsageStore
    limits: LimitsStore
    audit: Auditor

    @cached_property
    def accounts(self) -> Accounts:
        return Accounts(self.tenants, self.limits, self.audit, self.prices)

    @cached_property
    def prices(self) -> PriceSource:
        """The one price source (settings.price_book_path), shared by billing, budgets and the spend
        metric."""
        return load_price_source(self.settings.price_book_path)

    @cached_property
    def billing(self) -> BillingService:
        return BillingService(
            store=BillingStore(self.engine),
            usage=self.usage,
            tenants=self.tenants,
            config_dir=self.settings.config_dir / "billing",
            prices=self.prices,
            finalize_grace=timedelta(days=self.settings.billing.finalize_grace_days),
            production=self.settings.mode == "production",
            archive=True,  # issued PDFs and UBL rendered once, at finalization, and kept
        )


def open_stores(settings: Settings, *, migrate: bool = True) -> Stores:
    """The stores over the configured database (migrated first unless `migrate` is False)."""
    engine = make_engine(settings.db_url, sqlite_synchronous=settings.metering.sqlite_synchronous)
    if migrate:
        db_schema.upgrade(engine)
    return Stores(
        settings=settings,
        engine=engine,
        tenants=TenantStore(engine, settings.secret_key),
        usage=UsageStore(engine, append_wait_s=settings.metering.spool_after_s),
        limits=LimitsStore(engine),
        audit=Auditor(AuditStore(engine)),
    )
