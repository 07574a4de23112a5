"""The month-close test world: a real SQLite ledger, shipped billing configs, four tenants, a movable clock.

Shared by test_service_month_close.py and test_close_rules.py (the ``world`` fixture is in conftest.py).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Engine

from billing.documents import Invoice
from billing.prices import load_price_source
from billing.service import BillingService
from billing.store import BillingStore
from metering.clock import Period
from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from serving import db_schema


class MovableClock:
    """The service's clock; tests move it (``clock.now = ...``)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


ROOT = Path(__file__).resolve().parents[2]
S, Q = "smollm2-135m-instruct", "qwen2.5-7b-instruct"
JAN, FEB = Period(2026, 1), Period(2026, 2)
NOW = datetime(2026, 2, 2, 8, 0, tzinfo=UTC)


@dataclass
class World:
    engine: Engine
    usage: UsageStore
    tenants: TenantStore
    svc: BillingService
    config_dir: Path
    clock: MovableClock

    def use(
        self,
        tenant: str,
        day: date,
        *,
        model: str = S,
        prompt: int = 0,
        cached: int = 0,
        completion: int = 0,
        origin: str = "KZ",
        language: str | None = "ru",
    ) -> UsageEvent:
        when = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        e = UsageEvent(
            request_id="req_" + uuid.uuid4().hex,
            tenant_id=tenant,
            key_id="key_t",
            model=model,
            origin_country=origin,
            prompt_tokens=prompt,
            cached_prompt_tokens=cached,
            completion_tokens=completion,
            stream=False,
            outcome=Outcome.OK,
            started_at=when,
            finished_at=when,
            language=language,
        )
        assert self.usage.append_batch([e]) == [e.request_id]
        return e

    def ledger_tokens(self, tenant: str, period: Period) -> dict[tuple[str, str], int]:
        """(model, token type) -> tokens, straight from the ledger's summary API."""
        out: dict[tuple[str, str], int] = {}
        for r in self.usage.summary(["model"], tenant_id=tenant, start=period.start_at, end=period.end_at):
            m = str(r["model"])
            for token_type, n in (
                ("input", int(r["prompt_tokens"]) - int(r["cached_prompt_tokens"])),  # type: ignore[call-overload]
                ("cached_input", r["cached_prompt_tokens"]),
                ("output", r["completion_tokens"]),
            ):
                if n:
                    out[(m, token_type)] = int(str(n))
        return out


def uae_consumers_decided(rules_yaml: str) -> str:
    """The shipped tax rules with one provider decision these test worlds make: UAE consumers are
    invoiced without VAT (`b2c_unregistered: not_collecting`); shipped, they are held."""
    return rules_yaml.replace("\n  AE:\n", "\n  AE:\n    b2c_unregistered: not_collecting\n", 1)


def make_world(tmp_path: Path, *, finalize_grace: timedelta = timedelta(0)) -> Iterator[World]:
    config_dir = tmp_path / "billing"
    shutil.copytree(ROOT / "configs" / "billing", config_dir)
    rules = config_dir / "tax_rules.yaml"  # this provider decided: UAE consumers invoiced without VAT
    rules.write_text(uae_consumers_decided(rules.read_text("utf-8")), "utf-8")
    engine = make_engine(f"sqlite:///{tmp_path / 'tokenport.db'}")
    db_schema.upgrade(engine)
    usage, tenants = UsageStore(engine), TenantStore(engine, "s" * 32)
    clock = MovableClock(NOW)
    svc = BillingService(
        store=BillingStore(engine),
        usage=usage,
        tenants=tenants,
        config_dir=config_dir,
        prices=load_price_source(config_dir / "price_books.yaml"),
        clock=clock,
        finalize_grace=finalize_grace,
    )
    tenants.create_tenant(
        id="kz-bank", name="Almaty Bank JSC", billing_country="KZ", tax_id="123456789013", language="ru"
    )
    tenants.create_tenant(
        id="sa-retail",
        name="Riyadh Retail LLC",
        billing_country="SA",
        tax_id="300000000000003",
        language="ar",
    )
    tenants.create_tenant(
        id="ru-soft",
        name="OOO Soft",
        billing_country="RU",
        tax_id="7707083893",
        currency="CNY",
        language="ru",
    )
    tenants.create_tenant(id="ae-person", name="A. Person", billing_country="AE", business=False)
    yield World(engine, usage, tenants, svc, config_dir, clock)
    engine.dispose()


def january(w: World) -> None:
    w.use(
        "kz-bank", date(2026, 1, 3), prompt=40_000_000, cached=10_000_000, completion=20_000_000, origin="KZ"
    )
    w.use("kz-bank", date(2026, 1, 20), model=Q, prompt=120_000_000, completion=60_000_000, origin="UZ")
    w.use("sa-retail", date(2026, 1, 9), prompt=30_000_000, completion=5_000_000, origin="SA", language="ar")
    w.use("ru-soft", date(2026, 1, 15), prompt=70_000_000, completion=10_000_000, origin="RU")
    w.use("ru-soft", date(2026, 1, 31), prompt=1_000_000, completion=1_000_000, origin="BY")
    w.use("ae-person", date(2026, 1, 25), prompt=5_000_000, completion=2_000_000, origin="AE", language="en")
    w.use("kz-bank", date(2026, 2, 1), prompt=99_000_000, origin="KZ")  # February: not in January's invoice


def invoice_of(w: World, ref: str) -> Invoice:
    row = w.svc.store.get(ref)
    assert row.document is not None
    return Invoice.from_json_dict(row.document)


def line_tokens(inv: Invoice, kind: str = "usage") -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for line in inv.lines:
        if line.kind.value == kind and line.model and line.token_type:
            key = (line.model, line.token_type.value)
            out[key] = out.get(key, 0) + line.quantity_tokens
    return out


def issued_in_january(w: World, tenant: str) -> str:
    """Run and finalize `january`'s usage; the number of `tenant`'s invoice."""
    january(w)
    w.svc.run(JAN)
    row = next(r for r in w.svc.finalize(JAN).finalized if r.tenant_id == tenant)
    assert row.number is not None
    number: str = row.number
    return number
