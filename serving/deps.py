"""Typed FastAPI providers for the admin, tenant and ops routers (instead of one object handed to all).

create_app builds one `AppServices` and `install`s it on the app; `services` is the one place that
reads it back off the app. Routers are plain module-level `APIRouter`s and ask for exactly what they
use, e.g. `async def route(who: PrincipalDep, usage: UsageDep)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, FastAPI
from starlette.requests import Request

from billing.service import BillingService
from metering.metrics import Metrics
from metering.store_sql import UsageStore
from serving.accounts import Accounts
from serving.audit import Auditor
from serving.auth import Admin, AdminAuth, KeyRing, Principal
from serving.batches.service import BatchService
from serving.limits.cache import PolicyCache
from serving.limits.limiter import Limiter
from serving.metrics_listener import MetricsListener
from serving.proxy.pool import WorkerPool
from serving.services import Stores


@dataclass(frozen=True)
class AppServices:
    """What the FastAPI routes of one gateway use (built once by create_app)."""

    stores: Stores
    keyring: KeyRing
    admin: AdminAuth
    policies: PolicyCache
    limiter: Limiter
    pool: WorkerPool
    metrics: Metrics
    batches: BatchService
    metrics_token: str | None = None  # GET /metrics on the public port needs it (404 without one)
    metrics_listener: MetricsListener | None = None  # the operator's own metrics address


def install(app: FastAPI, services: AppServices) -> None:
    app.state.tokenport = services


def of_app(app: FastAPI) -> AppServices:
    """The one typed read of the app's services."""
    return cast(AppServices, app.state.tokenport)


def services(request: Request) -> AppServices:
    return of_app(cast(FastAPI, request.app))


ServicesDep = Annotated[AppServices, Depends(services)]


async def principal(request: Request, s: ServicesDep) -> Principal:
    """The tenant calling with an API key (401 otherwise)."""
    return await s.keyring.authenticate(request.headers.get("authorization"))


def admin(request: Request, s: ServicesDep) -> Admin:
    """The admin credential (401 otherwise)."""
    return s.admin.check(
        request.headers.get("authorization"), request.client.host if request.client else None
    )


def accounts(s: ServicesDep) -> Accounts:
    return s.stores.accounts


def usage(s: ServicesDep) -> UsageStore:
    return s.stores.usage


def billing(s: ServicesDep) -> BillingService:
    return s.stores.billing


def auditor(s: ServicesDep) -> Auditor:
    return s.stores.audit


def keyring(s: ServicesDep) -> KeyRing:
    return s.keyring


def policies(s: ServicesDep) -> PolicyCache:
    return s.policies


def limiter(s: ServicesDep) -> Limiter:
    return s.limiter


def pool(s: ServicesDep) -> WorkerPool:
    return s.pool


def metrics(s: ServicesDep) -> Metrics:
    return s.metrics


PrincipalDep = Annotated[Principal, Depends(principal)]
AdminDep = Annotated[Admin, Depends(admin)]
TenantsDep = Annotated[Accounts, Depends(accounts)]
UsageDep = Annotated[UsageStore, Depends(usage)]
BillingDep = Annotated[BillingService, Depends(billing)]
AuditDep = Annotated[Auditor, Depends(auditor)]
KeyRingDep = Annotated[KeyRing, Depends(keyring)]
PoliciesDep = Annotated[PolicyCache, Depends(policies)]
LimiterDep = Annotated[Limiter, Depends(limiter)]
PoolDep = Annotated[WorkerPool, Depends(pool)]
MetricsDep = Annotated[Metrics, Depends(metrics)]
