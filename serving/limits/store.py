"""The only SQL for limit policies (table limit_policies). Every change bumps the registry version,
so every gateway process reloads policies within its refresh interval (as it does for keys)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine

from metering.schema import api_keys, registry_version, tenants
from metering.tenants import RegistryError, to_aware, to_naive, utcnow
from serving.limits.policy import PERIODS, UNITS, Budget, LimitPolicy
from serving.tables import limit_policies

Scope = Literal["tenant", "key"]
UNSET: Any = object()
_FIELDS = (
    "rpm",
    "tpm",
    "max_tokens",
    "max_prompt_tokens",
    "request_timeout_s",
    "content_logging",
    "content_retention_days",
)


def parse_amount(value: str | Decimal | int) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise RegistryError(f"budget amount {value!r} is not a decimal number") from exc
    if not amount.is_finite() or amount < 0:
        raise RegistryError(f"budget amount {value!r} must be a finite number >= 0")
    return amount


def make_budget(unit: str, amount: str | Decimal | int, period: str, start: datetime | None = None) -> Budget:
    if unit not in UNITS:
        raise RegistryError(f"budget unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if period not in PERIODS:
        raise RegistryError(f"budget period must be one of {', '.join(PERIODS)}, got {period!r}")
    value = parse_amount(amount)
    if unit == "tokens" and value != value.to_integral_value():
        raise RegistryError("a token budget must be a whole number of tokens")
    return Budget(
        unit=unit,  # type: ignore[arg-type]
        amount=value,
        period=period,  # type: ignore[arg-type]
        start=(start or utcnow()) if period == "prepaid" else None,
    )


def _check_positive(name: str, value: Any) -> None:
    if (
        value is not None
        and value is not UNSET
        and (not isinstance(value, int) or isinstance(value, bool) or value < 1)
    ):
        raise RegistryError(f"{name} must be a whole number >= 1 (or unset)")


class LimitsStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def get(self, scope: Scope, scope_id: str) -> LimitPolicy | None:
        with self._engine.connect() as conn:
            row = (
                conn.execute(
                    select(limit_policies).where(
                        limit_policies.c.scope == scope, limit_policies.c.scope_id == scope_id
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else _policy(row)

    def all(self) -> tuple[dict[str, LimitPolicy], dict[str, LimitPolicy]]:
        """(tenant policies by tenant id, key policies by key id)."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(limit_policies)).mappings().all()
        by_tenant = {r["scope_id"]: _policy(r) for r in rows if r["scope"] == "tenant"}
        by_key = {r["scope_id"]: _policy(r) for r in rows if r["scope"] == "key"}
        return by_tenant, by_key

    def tenant_of(self, scope: Scope, scope_id: str) -> str:
        """The tenant a scope belongs to; RegistryError if the tenant or key does not exist."""
        with self._engine.connect() as conn:
            if scope == "tenant":
                found = conn.execute(select(tenants.c.id).where(tenants.c.id == scope_id)).scalar()
            else:
                found = conn.execute(select(api_keys.c.tenant_id).where(api_keys.c.id == scope_id)).scalar()
        if found is None:
            raise RegistryError(f"{scope} {scope_id!r} does not exist")
        return str(found)

    def update(
        self, scope: Scope, scope_id: str, *, budget: Budget | None = UNSET, **fields: Any
    ) -> LimitPolicy:
        """Change the given fields (None clears one); the rest stay. Returns the new policy."""
        unknown = set(fields) - set(_FIELDS)
        if unknown:
            raise RegistryError(f"unknown limit fields: {', '.join(sorted(unknown))}")
        for name in (
            "rpm",
            "tpm",
            "max_tokens",
            "max_prompt_tokens",
            "request_timeout_s",
            "content_retention_days",
        ):
            _check_positive(name, fields.get(name))
        if scope == "key" and any(
            fields.get(f) is not None and fields.get(f) is not UNSET
            for f in ("content_logging", "content_retention_days")
        ):
            raise RegistryError("content logging is a tenant setting, not a key setting")
        tenant_id = self.tenant_of(scope, scope_id)
        with self._engine.begin() as conn:
            current = self._locked(conn, scope, scope_id) or LimitPolicy()
            changes = {k: v for k, v in fields.items() if v is not UNSET}
            if budget is not UNSET:
                if (
                    budget is not None
                    and current.budget is not None
                    and budget.period == "prepaid"
                    and current.budget.period == "prepaid"
                    and current.budget.unit == budget.unit
                ):
                    budget = replace(budget, start=current.budget.start)  # same balance, new amount
                changes["budget"] = budget
            new = replace(current, **changes)
            self._write(conn, scope, scope_id, tenant_id, new)
        return new

    def top_up(self, scope: Scope, scope_id: str, amount: str | Decimal | int) -> LimitPolicy:
        """Add to a prepaid balance (the budget amount); usage already counted stays counted."""
        value = parse_amount(amount)
        tenant_id = self.tenant_of(scope, scope_id)
        with self._engine.begin() as conn:
            current = self._locked(conn, scope, scope_id)
            if current is None or current.budget is None or current.budget.period != "prepaid":
                raise RegistryError(f"{scope} {scope_id!r} has no prepaid budget to top up")
            if current.budget.unit == "tokens" and value != value.to_integral_value():
                raise RegistryError("a token budget takes whole tokens")
            new = replace(current, budget=replace(current.budget, amount=current.budget.amount + value))
            self._write(conn, scope, scope_id, tenant_id, new)
        return new

    def add_to_prepaid(self, conn: Connection, tenant_id: str, amount: Decimal) -> bool:
        """Raise the tenant's prepaid money budget by a credit granted in the caller's transaction
        (billing/credits.py), so the guard and the invoices draw on one balance; False: no such budget."""
        current = self._locked(conn, "tenant", tenant_id)
        if current is None or current.budget is None:
            return False
        if (current.budget.period, current.budget.unit) != ("prepaid", "money"):
            return False
        new = replace(current, budget=replace(current.budget, amount=current.budget.amount + amount))
        self._write(conn, "tenant", tenant_id, tenant_id, new)
        return True

    def clear(self, scope: Scope, scope_id: str) -> None:
        with self._engine.begin() as conn:
            res = conn.execute(
                delete(limit_policies).where(
                    limit_policies.c.scope == scope, limit_policies.c.scope_id == scope_id
                )
            )
            if res.rowcount:
                _bump(conn)

    # --- internals -----------------------------------------------------------------------
    @staticmethod
    def _locked(conn: Connection, scope: str, scope_id: str) -> LimitPolicy | None:
        q = select(limit_policies).where(
            limit_policies.c.scope == scope, limit_policies.c.scope_id == scope_id
        )
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).mappings().first()
        return None if row is None else _policy(row)

    @staticmethod
    def _write(conn: Connection, scope: str, scope_id: str, tenant_id: str, p: LimitPolicy) -> None:
        b = p.budget
        row = {
            "tenant_id": tenant_id,
            "rpm": p.rpm,
            "tpm": p.tpm,
            "max_tokens": p.max_tokens,
            "max_prompt_tokens": p.max_prompt_tokens,
            "request_timeout_s": p.request_timeout_s,
            "content_logging": p.content_logging,
            "content_retention_days": p.content_retention_days,
            "budget_unit": b.unit if b else None,
            "budget_amount": f"{b.amount:f}" if b else None,
            "budget_period": b.period if b else None,
            "budget_start": to_naive(b.start) if b and b.start else None,
            "updated_at": to_naive(utcnow()),
        }
        res = conn.execute(
            update(limit_policies)
            .where(limit_policies.c.scope == scope, limit_policies.c.scope_id == scope_id)
            .values(**row)
        )
        if not res.rowcount:
            conn.execute(insert(limit_policies).values(scope=scope, scope_id=scope_id, **row))
        _bump(conn)


def _bump(conn: Connection) -> None:
    """Move the registry version (the same row TenantStore moves), so caches reload."""
    res = conn.execute(
        update(registry_version)
        .where(registry_version.c.id == 1)
        .values(version=registry_version.c.version + 1)
    )
    if not res.rowcount:
        conn.execute(insert(registry_version).values(id=1, version=1))


def _policy(row: Any) -> LimitPolicy:
    r = dict(row)
    budget = None
    if r["budget_unit"] and r["budget_amount"] is not None and r["budget_period"]:
        budget = Budget(
            unit=r["budget_unit"],
            amount=Decimal(r["budget_amount"]),
            period=r["budget_period"],
            start=to_aware(r["budget_start"]),
        )
    return LimitPolicy(
        rpm=r["rpm"],
        tpm=r["tpm"],
        budget=budget,
        max_tokens=r["max_tokens"],
        max_prompt_tokens=r["max_prompt_tokens"],
        request_timeout_s=r["request_timeout_s"],
        content_logging=r["content_logging"],
        content_retention_days=r["content_retention_days"],
    )
