"""Limit policies: what a tenant (and optionally one key) may do, and how they combine.

A tenant's policy and a key's policy are both optional; the effective limits of a request are:
rate limits of the tenant and of the key (each its own bucket, both must admit), the tenant's budget
and the key's budget (both must hold the worst case), and the smallest of the caps (max_tokens,
prompt length, request timeout) given by the key, the tenant, and the settings' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Literal

BudgetUnit = Literal["tokens", "money"]
BudgetPeriod = Literal["month", "prepaid"]
MICRO = Decimal(1_000_000)  # money is held in integer millionths of the currency's major unit
UNITS: tuple[str, ...] = ("tokens", "money")
PERIODS: tuple[str, ...] = ("month", "prepaid")


@dataclass(frozen=True, slots=True)
class Budget:
    """Tokens or money (the tenant's currency), per calendar month (UTC) or as a prepaid balance."""

    unit: BudgetUnit
    amount: Decimal
    period: BudgetPeriod
    start: datetime | None = None  # prepaid: usage since this moment counts against the balance

    def window(self, now: datetime) -> tuple[str, datetime]:
        """(window id, start of the window): usage in the ledger since `start` counts."""
        if self.period == "month":
            first = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            return f"m{first:%Y%m}", first
        start = (self.start or datetime(1970, 1, 1, tzinfo=UTC)).astimezone(UTC)
        return f"p{int(start.timestamp())}", start

    def limit_units(self) -> int:
        """The budget as an integer: tokens, or millionths of the currency unit (rounded down)."""
        scaled = self.amount if self.unit == "tokens" else self.amount * MICRO
        return int(scaled.to_integral_value(rounding=ROUND_FLOOR))

    def number(self, units: int) -> str:
        """An integer amount of this budget's units as an exact decimal string (tokens or currency)."""
        if self.unit == "tokens":
            return str(units)
        return f"{(Decimal(units) / MICRO).normalize():f}"

    def show(self, units: int) -> str:
        return f"{units} tokens" if self.unit == "tokens" else self.number(units)


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    rpm: int | None = None
    tpm: int | None = None
    budget: Budget | None = None
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None
    request_timeout_s: int | None = None
    content_logging: bool | None = None  # tenant only
    content_retention_days: int | None = None  # tenant only

    def is_empty(self) -> bool:
        return self == LimitPolicy()

    def as_dict(self) -> dict[str, Any]:
        b = self.budget
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "budget": None
            if b is None
            else {
                "unit": b.unit,
                "amount": f"{b.amount:f}",
                "period": b.period,
                "since": b.start.isoformat() if b.start else None,
            },
            "max_tokens": self.max_tokens,
            "max_prompt_tokens": self.max_prompt_tokens,
            "request_timeout_s": self.request_timeout_s,
            "content_logging": self.content_logging,
            "content_retention_days": self.content_retention_days,
        }


@dataclass(frozen=True, slots=True)
class Defaults:
    """Limits for tenants without their own (from settings: `limits.*`)."""

    rpm: int | None = None
    tpm: int | None = None
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None
    request_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Effective:
    tenant_rpm: int | None
    tenant_tpm: int | None
    key_rpm: int | None
    key_tpm: int | None
    tenant_budget: Budget | None
    key_budget: Budget | None
    max_tokens: int | None
    max_prompt_tokens: int | None
    timeout_s: float

    @property
    def unlimited(self) -> bool:
        return (
            self.tenant_rpm is None
            and self.tenant_tpm is None
            and self.key_rpm is None
            and self.key_tpm is None
            and self.tenant_budget is None
            and self.key_budget is None
        )


def _smallest(*values: float | None) -> int | float | None:
    given = [v for v in values if v is not None]
    return min(given) if given else None


def combine(tenant: LimitPolicy | None, key: LimitPolicy | None, defaults: Defaults) -> Effective:
    t = tenant or LimitPolicy()
    k = key or LimitPolicy()
    max_tokens = _smallest(k.max_tokens, t.max_tokens if t.max_tokens is not None else defaults.max_tokens)
    max_prompt = _smallest(
        k.max_prompt_tokens,
        t.max_prompt_tokens if t.max_prompt_tokens is not None else defaults.max_prompt_tokens,
    )
    timeout = _smallest(k.request_timeout_s, t.request_timeout_s, defaults.request_timeout_s)
    return Effective(
        tenant_rpm=t.rpm if t.rpm is not None else defaults.rpm,
        tenant_tpm=t.tpm if t.tpm is not None else defaults.tpm,
        key_rpm=k.rpm,
        key_tpm=k.tpm,
        tenant_budget=t.budget,
        key_budget=k.budget,
        max_tokens=int(max_tokens) if max_tokens is not None else None,
        max_prompt_tokens=int(max_prompt) if max_prompt is not None else None,
        timeout_s=float(timeout if timeout is not None else defaults.request_timeout_s),
    )
