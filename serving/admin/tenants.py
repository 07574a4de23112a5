"""Admin API for tenants, keys, limits and budgets (/admin/v1), behind the admin credential.

Every change goes through the accounts service (serving/accounts.py), which audits it. A key's
plaintext is in the response that creates it and nowhere else (not in the audit log, not in any
later response).

    GET    /admin/v1/tenants                         list
    POST   /admin/v1/tenants                         create (201)
    GET    /admin/v1/tenants/{tenant_id}             tenant + limits
    PATCH  /admin/v1/tenants/{tenant_id}/limits      change limits / budget / caps / models / content logging
    DELETE /admin/v1/tenants/{tenant_id}/limits      back to the defaults
    GET    /admin/v1/tenants/{tenant_id}/budget      used, held, remaining in the current window
    POST   /admin/v1/tenants/{tenant_id}/budget/top-up   add to a prepaid balance
    GET    /admin/v1/tenants/{tenant_id}/keys        list (ids and prefixes only)
    POST   /admin/v1/tenants/{tenant_id}/keys        create (201; the key is shown once)
    GET    /admin/v1/keys/{key_id}                   one key + its limits
    PATCH  /admin/v1/keys/{key_id}/limits            the key's own limits and budget
    POST   /admin/v1/keys/{key_id}/revoke            revoke (every gateway refuses it within 0.25 s)
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from metering.tenants import Tenant
from serving.accounts import UNSET, key_expiry, key_json, tenant_json
from serving.deps import AdminDep, KeyRingDep, LimiterDep, PoliciesDep, TenantsDep
from serving.errors import InvalidRequest
from serving.limits.policy import LimitPolicy
from serving.limits.store import make_budget

router = APIRouter(prefix="/admin/v1", tags=["admin"])
TenantId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
KeyId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^key_[0-9a-f]{1,28}$")]
Amount = (
    Annotated[str, Field(pattern=r"^[0-9]{1,15}(\.[0-9]{1,6})?$")] | Annotated[int, Field(ge=0, le=10**15)]
)
ModelName = Annotated[str, Field(min_length=1, max_length=128)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantIn(_In):
    id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    billing_country: str = Field(min_length=2, max_length=2)
    business: bool = True
    tax_id: str | None = Field(default=None, max_length=64)
    currency: str = Field(default="USD", min_length=3, max_length=3)
    language: str | None = Field(default=None, max_length=8)
    allowed_models: list[ModelName] | None = Field(default=None, max_length=256)


class TenantPatch(_In):
    """PATCH /admin/v1/tenants/{id}: the fields to change (the same names as POST)."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    billing_country: str | None = Field(default=None, min_length=2, max_length=2)
    business: bool | None = None
    tax_id: str | None = Field(default=None, max_length=64)
    currency: str | None = Field(default=None, min_length=3, max_length=3)
    language: str | None = Field(default=None, max_length=8)


class BudgetIn(_In):
    unit: Literal["tokens", "money"]
    amount: Amount
    period: Literal["month", "prepaid"] = "month"


class KeyLimitsIn(_In):
    rpm: int | None = Field(default=None, ge=1, le=10**9)
    tpm: int | None = Field(default=None, ge=1, le=10**12)
    budget: BudgetIn | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=10**7)
    max_prompt_tokens: int | None = Field(default=None, ge=1, le=10**8)
    request_timeout_s: int | None = Field(default=None, ge=1, le=86_400)


class TenantLimitsIn(KeyLimitsIn):
    allowed_models: list[ModelName] | None = Field(default=None, max_length=256)
    content_logging: bool | None = None
    content_retention_days: int | None = Field(default=None, ge=1, le=3650)


class TopUpIn(_In):
    amount: Amount


class KeyIn(_In):
    name: str | None = Field(default=None, max_length=200)
    expires_at: datetime | None = None
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status, media_type="application/json")


def _limit_changes(body: KeyLimitsIn) -> dict[str, Any]:
    """The fields the client sent (null clears one), ready for LimitsStore.update."""
    sent = body.model_fields_set
    changes: dict[str, Any] = {
        f: getattr(body, f)
        for f in (
            "rpm",
            "tpm",
            "max_tokens",
            "max_prompt_tokens",
            "request_timeout_s",
            "content_logging",
            "content_retention_days",
        )
        if f in sent
    }
    if "budget" in sent:
        b = body.budget
        changes["budget"] = None if b is None else make_budget(b.unit, b.amount, b.period)
    return changes


@router.get("/tenants")
async def list_tenants(_admin: AdminDep, accounts: TenantsDep) -> Response:
    return _json({"object": "list", "data": await asyncio.to_thread(accounts.tenants_json)})


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantIn, admin: AdminDep, accounts: TenantsDep) -> Response:
    t = await asyncio.to_thread(lambda: accounts.create_tenant(admin.who(), **body.model_dump()))
    return _json(tenant_json(t), 201)


@router.patch("/tenants/{tenant_id}")
async def update_tenant(
    tenant_id: TenantId, body: TenantPatch, admin: AdminDep, accounts: TenantsDep
) -> Response:
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise InvalidRequest("Give at least one field to change.", param="body")
    for field in ("name", "billing_country", "business", "currency"):
        if field in changes and changes[field] is None:
            raise InvalidRequest(f"{field} cannot be null.", param=field)
    t = await asyncio.to_thread(accounts.update_tenant, admin.who(), tenant_id, changes)
    return _json(tenant_json(t))


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: TenantId, _admin: AdminDep, accounts: TenantsDep) -> Response:
    def load() -> tuple[Tenant, LimitPolicy | None]:
        return accounts.tenant(tenant_id), accounts.policy("tenant", tenant_id)

    return _json(tenant_json(*await asyncio.to_thread(load)))


@router.patch("/tenants/{tenant_id}/limits")
async def set_tenant_limits(
    tenant_id: TenantId, body: TenantLimitsIn, admin: AdminDep, accounts: TenantsDep, policies: PoliciesDep
) -> Response:
    models = body.allowed_models if "allowed_models" in body.model_fields_set else UNSET

    def change() -> tuple[Tenant, LimitPolicy | None]:
        accounts.set_limits(admin.who(), "tenant", tenant_id, _limit_changes(body), allowed_models=models)
        return accounts.tenant(tenant_id), accounts.policy("tenant", tenant_id)

    t, policy = await asyncio.to_thread(change)
    await policies.refresh(force=True)
    return _json(tenant_json(t, policy))


@router.delete("/tenants/{tenant_id}/limits")
async def clear_tenant_limits(
    tenant_id: TenantId, admin: AdminDep, accounts: TenantsDep, policies: PoliciesDep
) -> Response:
    def change() -> Tenant:
        accounts.set_limits(admin.who(), "tenant", tenant_id, {}, clear=True, action="tenant.limits.clear")
        return accounts.tenant(tenant_id)

    t = await asyncio.to_thread(change)
    await policies.refresh(force=True)
    return _json(tenant_json(t))


@router.get("/tenants/{tenant_id}/budget")
async def budget(
    tenant_id: TenantId, _admin: AdminDep, accounts: TenantsDep, limiter: LimiterDep
) -> Response:
    t = await asyncio.to_thread(accounts.tenant, tenant_id)
    return _json({"object": "budget", "tenant_id": tenant_id, "budget": await limiter.budget_status(t)})


@router.post("/tenants/{tenant_id}/budget/top-up")
async def top_up(
    tenant_id: TenantId, body: TopUpIn, admin: AdminDep, accounts: TenantsDep, policies: PoliciesDep
) -> Response:
    pol = await asyncio.to_thread(accounts.top_up, admin.who(), tenant_id, body.amount)
    await policies.refresh(force=True)
    return _json({"object": "limits", "tenant_id": tenant_id, **pol.as_dict()})


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: TenantId, _admin: AdminDep, accounts: TenantsDep) -> Response:
    return _json({"object": "list", "data": await asyncio.to_thread(accounts.keys_json, tenant_id)})


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: TenantId, body: KeyIn, admin: AdminDep, accounts: TenantsDep) -> Response:
    expires = key_expiry(body.expires_at, body.expires_in_days)
    key, plaintext = await asyncio.to_thread(
        lambda: accounts.create_key(admin.who(), tenant_id, name=body.name, expires_at=expires)
    )
    return _json({**key_json(key), "key": plaintext}, 201)


@router.get("/keys/{key_id}")
async def get_key(key_id: KeyId, _admin: AdminDep, accounts: TenantsDep) -> Response:
    k = await asyncio.to_thread(accounts.key, key_id)
    return _json(key_json(k, await asyncio.to_thread(accounts.policy, "key", key_id)))


@router.patch("/keys/{key_id}/limits")
async def set_key_limits(
    key_id: KeyId, body: KeyLimitsIn, admin: AdminDep, accounts: TenantsDep, policies: PoliciesDep
) -> Response:
    k = await asyncio.to_thread(accounts.key, key_id)
    pol = await asyncio.to_thread(accounts.set_limits, admin.who(), "key", key_id, _limit_changes(body))
    await policies.refresh(force=True)
    return _json(key_json(k, pol))


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: KeyId, admin: AdminDep, accounts: TenantsDep, keyring: KeyRingDep) -> Response:
    await asyncio.to_thread(accounts.key, key_id)
    key = await asyncio.to_thread(accounts.revoke_key, admin.who(), key_id)
    await keyring.refresh()
    return _json(key_json(key))
