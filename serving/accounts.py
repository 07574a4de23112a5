"""Tenants, keys, limits and budgets as one application service, shared by the admin API and the CLI.

Every change is audited (serving/audit.py) and refused with a typed `RegistryError`
(metering/tenants.py) that each surface maps by type. The JSON shapes of a tenant and a key are
defined here once (`tenant_json`, `key_json`): the admin API answers them, the CLI prints them with
`--json`. A key's plaintext is in the result that creates it and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from billing.errors import BillingError
from billing.prices import PriceSource
from billing.render.i18n import languages as render_languages
from billing.taxid import validate as validate_tax_id
from metering.clock import utcnow
from metering.tenants import ApiKey, InvalidTenantField, KeyNotFound, Tenant, TenantNotFound, TenantStore
from serving.audit import Auditor, Who
from serving.dates import InvalidTime, checked
from serving.limits.policy import Budget, LimitPolicy
from serving.limits.store import LimitsStore, Scope

UNSET: Any = object()


def tenant_json(t: Tenant, limits: LimitPolicy | None = None) -> dict[str, Any]:
    return {
        "object": "tenant",
        "id": t.id,
        "name": t.name,
        "billing_country": t.billing_country,
        "business": t.business,
        "tax_id": t.tax_id,
        "currency": t.currency,
        "language": t.language,
        "allowed_models": list(t.allowed_models) if t.allowed_models is not None else None,
        "created_at": t.created_at.isoformat(),
        "limits": (limits or LimitPolicy()).as_dict(),
    }


def key_json(k: ApiKey, limits: LimitPolicy | None = None) -> dict[str, Any]:
    return {
        "object": "api_key",
        "id": k.id,
        "tenant_id": k.tenant_id,
        "prefix": k.prefix,
        "name": k.name,
        "created_at": k.created_at.isoformat(),
        "expires_at": k.expires_at.isoformat() if k.expires_at else None,
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        "limits": (limits or LimitPolicy()).as_dict(),
    }


def _detail(changes: dict[str, Any]) -> dict[str, Any]:
    """Limit changes as audit detail (a budget as unit, amount, period)."""
    return {
        k: ({"unit": v.unit, "amount": f"{v.amount:f}", "period": v.period} if isinstance(v, Budget) else v)
        for k, v in changes.items()
    }


def key_expiry(expires_at: datetime | None, expires_in_days: int | None) -> datetime | None:
    """When a new key expires: an instant in the future, or in N days; InvalidTenantField otherwise."""
    if expires_at is not None and expires_in_days is not None:
        raise InvalidTenantField("give expires_at or expires_in_days, not both")
    if expires_at is not None:
        expires = checked(expires_at, "expires_at")
        if expires <= utcnow():
            raise InvalidTenantField("expires_at must be in the future")
        return expires
    if expires_in_days is not None:
        try:
            return checked(utcnow() + timedelta(days=expires_in_days), "expires_in_days")
        except (OverflowError, InvalidTime) as exc:  # the CLI's --expires-in-days has no upper bound
            raise InvalidTenantField(f"expires_in_days {expires_in_days} is out of range") from exc
    return None


def validate_tenant_fields(fields: dict[str, Any], prices: PriceSource | None) -> dict[str, Any]:
    """The one check of a tenant's billing fields, on every write path (CLI and admin API, create and
    update): a tax id valid for the billing country, a currency the price book can
    invoice in, a language the documents are rendered in. Refusing here is what keeps a tenant from
    being created that no invoice run could ever bill."""
    out = dict(fields)
    country = str(out.get("billing_country") or "").upper()
    if out.get("tax_id"):
        try:
            validate_tax_id(country, str(out["tax_id"]))
        except BillingError as exc:
            raise InvalidTenantField(f"{exc} (every invoice for this tenant would fail)") from exc
    language = out.get("language")
    if language is not None and language not in render_languages():
        raise InvalidTenantField(
            f"language {language!r} is not a document language; choose from {', '.join(render_languages())}"
        )
    currency = str(out.get("currency") or "").upper()
    if prices is not None and prices.available and currency:
        offered = {c for v in prices.book().versions for c in v.currencies}
        if currency not in offered:
            raise InvalidTenantField(
                f"currency {currency!r} has no price book ({', '.join(sorted(offered))} have): "
                "nothing could be invoiced in it"
            )
    return out


@dataclass(frozen=True)
class Accounts:
    tenants: TenantStore
    limits: LimitsStore
    audit: Auditor
    prices: PriceSource | None = None  # the one price source: the currencies a tenant may be billed in

    # --- reads -----------------------------------------------------------------------------
    def tenant(self, tenant_id: str) -> Tenant:
        t = self.tenants.get_tenant(tenant_id)
        if t is None:
            raise TenantNotFound(tenant_id)
        return t

    def key(self, key_id: str) -> ApiKey:
        k = self.tenants.get_key(key_id)
        if k is None:
            raise KeyNotFound(key_id)
        return k

    def policy(self, scope: Scope, scope_id: str) -> LimitPolicy | None:
        return self.limits.get(scope, scope_id)

    def tenants_json(self) -> list[dict[str, Any]]:
        policies, _ = self.limits.all()
        return [tenant_json(t, policies.get(t.id)) for t in self.tenants.list_tenants()]

    def keys_json(self, tenant_id: str | None, *, must_exist: bool = True) -> list[dict[str, Any]]:
        """The keys (of one tenant, or all), with their limits; TenantNotFound for an unknown tenant
        unless `must_exist` is False (then an empty list)."""
        if tenant_id is not None and must_exist:
            self.tenant(tenant_id)
        _, policies = self.limits.all()
        return [key_json(k, policies.get(k.id)) for k in self.tenants.list_keys(tenant_id)]

    # --- changes (audited) -------------------------------------------------------------------
    def create_tenant(
        self,
        who: Who,
        *,
        id: str,
        name: str,
        billing_country: str,
        business: bool = True,
        tax_id: str | None = None,
        currency: str = "USD",
        language: str | None = None,
        allowed_models: list[str] | None = None,
    ) -> Tenant:
        fields: dict[str, Any] = {
            "id": id,
            "name": name,
            "billing_country": billing_country,
            "business": business,
            "tax_id": tax_id,
            "currency": currency,
            "language": language,
            "allowed_models": allowed_models,
        }
        fields = validate_tenant_fields(fields, self.prices)
        return self.audit.run(
            who,
            "tenant.create",
            lambda: self.tenants.create_tenant(**fields),
            target=id,
            tenant_id=id,
            detail=fields,
        )

    def update_tenant(self, who: Who, tenant_id: str, changes: dict[str, Any]) -> Tenant:
        """Edit a tenant's billing data (audited, validated as at creation, on the merged result). The
        next draft or re-issue uses it; issued documents keep the buyer they were issued to."""
        before = self.tenant(tenant_id)
        merged = {
            "billing_country": before.billing_country,
            "tax_id": before.tax_id,
            "currency": before.currency,
            "language": before.language,
        } | changes
        validate_tenant_fields(merged, self.prices)
        if merged["currency"] != before.currency:
            self._refuse_money_budgets(tenant_id, before.currency)
        old = {k: getattr(before, k) for k in changes}
        return self.audit.run(
            who,
            "tenant.update",
            lambda: self.tenants.update_tenant(tenant_id, **changes),
            target=tenant_id,
            tenant_id=tenant_id,
            detail={"changes": changes, "before": old},
        )

    def _refuse_money_budgets(self, tenant_id: str, currency: str) -> None:
        """A money budget is an amount in the tenant's currency: changing the currency under it would
        silently re-denominate it (100 USD becoming 100 KZT), so the budget goes first."""
        by_tenant, by_key = self.limits.all()
        keys = {k.id for k in self.tenants.list_keys(tenant_id)}
        scoped = [("tenant", tenant_id, by_tenant.get(tenant_id))]
        scoped += [("key", k, p) for k, p in by_key.items() if k in keys]
        money = [f"{scope} {sid}" for scope, sid, p in scoped if p and p.budget and p.budget.unit == "money"]
        if money:
            raise InvalidTenantField(
                f"currency: {', '.join(money)} has a money budget in {currency}; remove it "
                "(tenants set-limits --no-budget) before changing the currency, then set it again"
            )

    def create_key(
        self, who: Who, tenant_id: str, *, name: str | None, expires_at: datetime | None
    ) -> tuple[ApiKey, str]:
        return self.audit.run(
            who,
            "key.create",
            lambda: self.tenants.create_key(tenant_id, name=name, expires_at=expires_at),
            tenant_id=tenant_id,
            detail={"name": name, "expires_at": expires_at.isoformat() if expires_at else None},
            describe=lambda res: {"target": res[0].id, "prefix": res[0].prefix},
        )

    def revoke_key(self, who: Who, key_id: str) -> ApiKey:
        found = self.tenants.get_key(key_id)
        return self.audit.run(
            who,
            "key.revoke",
            lambda: self.tenants.revoke_key(key_id),
            target=key_id,
            tenant_id=found.tenant_id if found else None,
            detail={"prefix": found.prefix} if found else None,
        )

    def set_limits(
        self,
        who: Who,
        scope: Scope,
        scope_id: str,
        changes: dict[str, Any],
        *,
        clear: bool = False,
        allowed_models: list[str] | None = UNSET,
        action: str | None = None,
    ) -> LimitPolicy:
        """Change a tenant's or key's limits (`changes` as LimitsStore.update takes them; `clear` first
        drops every limit; `allowed_models` also sets a tenant's models, None = every model)."""
        tenant_id = self.tenant(scope_id).id if scope == "tenant" else self.key(scope_id).tenant_id

        def change() -> LimitPolicy:
            if clear:
                self.limits.clear(scope, scope_id)
            if allowed_models is not UNSET:
                self.tenants.set_allowed_models(scope_id, allowed_models)
            if changes:
                return self.limits.update(scope, scope_id, **changes)
            return self.limits.get(scope, scope_id) or LimitPolicy()

        detail = _detail(changes)
        if clear:
            detail["clear"] = True
        if allowed_models is not UNSET:
            detail["allowed_models"] = allowed_models
        return self.audit.run(
            who, action or f"{scope}.limits", change, target=scope_id, tenant_id=tenant_id, detail=detail
        )

    def top_up(self, who: Who, tenant_id: str, amount: str | Decimal | int) -> LimitPolicy:
        self.tenant(tenant_id)
        return self.audit.run(
            who,
            "tenant.budget.top_up",
            lambda: self.limits.top_up("tenant", tenant_id, amount),
            target=tenant_id,
            tenant_id=tenant_id,
            detail={"amount": str(amount)},
        )

    def set_models(self, who: Who, tenant_id: str, allowed_models: list[str] | None) -> Tenant:
        """Restrict a tenant to these models (None: every model)."""
        return self.audit.run(
            who,
            "tenant.models",
            lambda: self.tenants.set_allowed_models(tenant_id, allowed_models),
            target=tenant_id,
            tenant_id=tenant_id,
            detail={"allowed_models": allowed_models},
        )
