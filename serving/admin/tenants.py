"""Admin API for tenants, keys, limits and budgets (/admin/v1), behind the admin credential.

Every change is written to the audit log (serving/admin/audit.py). A key's plaintext is in the
response that creates it and nowhere else (not in the audit log, not in any later response).

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

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from metering.tenants import ApiKey, RegistryError, Tenant
from serving.admin.audit import Who
from serving.admin.auth import Admin
from serving.errors import Conflict, InvalidRequest, NotFound, TokenportError
from serving.limits.policy import LimitPolicy
from serving.limits.store import make_budget

if TYPE_CHECKING:
    from serving.app import Platform

T = TypeVar("T")
TenantId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
KeyId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^key_[0-9a-f]{1,28}$")]
Amount = Annotated[str, Field(pattern=r"^[0-9]{1,15}(\.[0-9]{1,6})?$")] | Annotated[int, Field(ge=0, le=10**15)]


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
    allowed_models: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(default=None,
                                                                                             max_length=256)


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
    allowed_models: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(default=None,
                                                                                             max_length=256)
    content_logging: bool | None = None
    content_retention_days: int | None = Field(default=None, ge=1, le=3650)


class TopUpIn(_In):
    amount: Amount


class KeyIn(_In):
    name: str | None = Field(default=None, max_length=200)
    expires_at: datetime | None = None
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


def tenant_json(t: Tenant, limits: LimitPolicy | None = None) -> dict[str, Any]:
    return {"object": "tenant", "id": t.id, "name": t.name, "billing_country": t.billing_country,
            "business": t.business, "tax_id": t.tax_id, "currency": t.currency, "language": t.language,
            "allowed_models": list(t.allowed_models) if t.allowed_models is not None else None,
            "created_at": t.created_at.isoformat(), "limits": (limits or LimitPolicy()).as_dict()}


def key_json(k: ApiKey, limits: LimitPolicy | None = None) -> dict[str, Any]:
    return {"object": "api_key", "id": k.id, "tenant_id": k.tenant_id, "prefix": k.prefix, "name": k.name,
            "created_at": k.created_at.isoformat(),
            "expires_at": k.expires_at.isoformat() if k.expires_at else None,
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            "limits": (limits or LimitPolicy()).as_dict()}


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status, media_type="application/json")


def registry_error(exc: RegistryError) -> TokenportError:
    msg = str(exc)
    if "does not exist" in msg:
        return NotFound(msg[0].upper() + msg[1:] + ".")
    if "already exists" in msg:
        return Conflict(msg[0].upper() + msg[1:] + ".", code="already_exists")
    return InvalidRequest(msg[0].upper() + msg[1:] + ".")


async def _call(fn: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(fn)
    except RegistryError as exc:
        raise registry_error(exc) from exc


def _limit_changes(body: KeyLimitsIn) -> dict[str, Any]:
    """The fields the client sent (null clears one), ready for LimitsStore.update."""
    sent = body.model_fields_set
    changes: dict[str, Any] = {f: getattr(body, f) for f in ("rpm", "tpm", "max_tokens", "max_prompt_tokens",
                                                             "request_timeout_s", "content_logging",
                                                             "content_retention_days") if f in sent}
    if "budget" in sent:
        b = body.budget
        changes["budget"] = None if b is None else make_budget(b.unit, b.amount, b.period)
    return changes


def build(platform: "Platform") -> APIRouter:
    r = APIRouter(prefix="/admin/v1", tags=["admin"])
    AdminDep = Annotated[Admin, Depends(platform.admin)]
    tenants = platform.tenants
    g = platform.guardrails
    limits, audit = g.store, g.audit

    def existing_tenant(tenant_id: str) -> Tenant:
        t = tenants.get_tenant(tenant_id)
        if t is None:
            raise RegistryError(f"tenant {tenant_id!r} does not exist")
        return t

    def existing_key(key_id: str) -> ApiKey:
        k = tenants.get_key(key_id)
        if k is None:
            raise RegistryError(f"key {key_id!r} does not exist")
        return k

    @r.get("/tenants")
    async def list_tenants(_admin: AdminDep) -> Response:
        rows = await _call(tenants.list_tenants)
        pols, _ = await _call(limits.all)
        return _json({"object": "list", "data": [tenant_json(t, pols.get(t.id)) for t in rows]})

    @r.post("/tenants", status_code=201)
    async def create_tenant(body: TenantIn, admin: AdminDep) -> Response:
        fields = body.model_dump()
        t = await _call(lambda: audit.run(Who.api(admin), "tenant.create", lambda: tenants.create_tenant(**fields),
                                          target=body.id, tenant_id=body.id, detail=fields))
        return _json(tenant_json(t), 201)

    @r.get("/tenants/{tenant_id}")
    async def get_tenant(tenant_id: TenantId, _admin: AdminDep) -> Response:
        t = await _call(lambda: existing_tenant(tenant_id))
        return _json(tenant_json(t, await _call(lambda: limits.get("tenant", tenant_id))))

    @r.patch("/tenants/{tenant_id}/limits")
    async def set_tenant_limits(tenant_id: TenantId, body: TenantLimitsIn, admin: AdminDep) -> Response:
        def change() -> Tenant:
            existing_tenant(tenant_id)
            changes = _limit_changes(body)
            if changes:
                limits.update("tenant", tenant_id, **changes)
            if "allowed_models" in body.model_fields_set:
                tenants.set_allowed_models(tenant_id, body.allowed_models)
            return existing_tenant(tenant_id)

        detail = body.model_dump(mode="json", exclude_unset=True)
        t = await _call(lambda: audit.run(Who.api(admin), "tenant.limits", change, target=tenant_id,
                                          tenant_id=tenant_id, detail=detail))
        await g.policies.refresh(force=True)
        return _json(tenant_json(t, await _call(lambda: limits.get("tenant", tenant_id))))

    @r.delete("/tenants/{tenant_id}/limits")
    async def clear_tenant_limits(tenant_id: TenantId, admin: AdminDep) -> Response:
        def change() -> Tenant:
            t = existing_tenant(tenant_id)
            limits.clear("tenant", tenant_id)
            return t

        t = await _call(lambda: audit.run(Who.api(admin), "tenant.limits.clear", change, target=tenant_id,
                                          tenant_id=tenant_id))
        await g.policies.refresh(force=True)
        return _json(tenant_json(t))

    @r.get("/tenants/{tenant_id}/budget")
    async def budget(tenant_id: TenantId, _admin: AdminDep) -> Response:
        t = await _call(lambda: existing_tenant(tenant_id))
        status = await g.limiter.budget_status(t)
        return _json({"object": "budget", "tenant_id": tenant_id, "budget": status})

    @r.post("/tenants/{tenant_id}/budget/top-up")
    async def top_up(tenant_id: TenantId, body: TopUpIn, admin: AdminDep) -> Response:
        pol = await _call(lambda: audit.run(Who.api(admin), "tenant.budget.top_up",
                                            lambda: limits.top_up("tenant", tenant_id, body.amount),
                                            target=tenant_id, tenant_id=tenant_id, detail={"amount": str(body.amount)}))
        await g.policies.refresh(force=True)
        return _json({"object": "limits", "tenant_id": tenant_id, **pol.as_dict()})

    @r.get("/tenants/{tenant_id}/keys")
    async def list_keys(tenant_id: TenantId, _admin: AdminDep) -> Response:
        await _call(lambda: existing_tenant(tenant_id))
        rows = await _call(lambda: tenants.list_keys(tenant_id))
        _, pols = await _call(limits.all)
        return _json({"object": "list", "data": [key_json(k, pols.get(k.id)) for k in rows]})

    @r.post("/tenants/{tenant_id}/keys", status_code=201)
    async def create_key(tenant_id: TenantId, body: KeyIn, admin: AdminDep) -> Response:
        if body.expires_at is not None and body.expires_in_days is not None:
            raise InvalidRequest("Give expires_at or expires_in_days, not both.", param="expires_at")
        expires = body.expires_at
        if expires is not None:
            expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
            if expires <= datetime.now(UTC):
                raise InvalidRequest("expires_at must be in the future.", param="expires_at")
        elif body.expires_in_days is not None:
            expires = datetime.now(UTC) + timedelta(days=body.expires_in_days)
        key, plaintext = await _call(lambda: audit.run(
            Who.api(admin), "key.create", lambda: tenants.create_key(tenant_id, name=body.name, expires_at=expires),
            tenant_id=tenant_id, detail={"name": body.name, "expires_at": expires.isoformat() if expires else None},
            describe=lambda res: {"target": res[0].id, "prefix": res[0].prefix}))
        return _json({**key_json(key), "key": plaintext}, 201)

    @r.get("/keys/{key_id}")
    async def get_key(key_id: KeyId, _admin: AdminDep) -> Response:
        k = await _call(lambda: existing_key(key_id))
        return _json(key_json(k, await _call(lambda: limits.get("key", key_id))))

    @r.patch("/keys/{key_id}/limits")
    async def set_key_limits(key_id: KeyId, body: KeyLimitsIn, admin: AdminDep) -> Response:
        k = await _call(lambda: existing_key(key_id))

        def change() -> LimitPolicy:
            changes = _limit_changes(body)
            return limits.update("key", key_id, **changes) if changes else (limits.get("key", key_id)
                                                                             or LimitPolicy())

        pol = await _call(lambda: audit.run(Who.api(admin), "key.limits", change, target=key_id,
                                            tenant_id=k.tenant_id,
                                            detail=body.model_dump(mode="json", exclude_unset=True)))
        await g.policies.refresh(force=True)
        return _json(key_json(k, pol))

    @r.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: KeyId, admin: AdminDep) -> Response:
        k = await _call(lambda: existing_key(key_id))
        key = await _call(lambda: audit.run(Who.api(admin), "key.revoke", lambda: tenants.revoke_key(key_id),
                                            target=key_id, tenant_id=k.tenant_id, detail={"prefix": k.prefix}))
        await platform.keyring.refresh()
        return _json(key_json(key))

    return r

