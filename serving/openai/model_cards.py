"""What GET /v1/models tells a buyer about one model: OpenAI's four fields, then ours.

- `context_length`: the catalogue's max_model_len (null for a model only given with `--worker`);
- `languages`: the catalogue's `languages` (ISO 639-1) when stated, else null;
- `capabilities`: the routes it serves (serving/openai/capabilities.py), and `tools` when its worker
  parses tool calls (`tool_call_parser` in the catalogue);
- `pricing`: this tenant's prices for it this month, from the one price source (billing/prices.py),
  in the tenant's currency, per 1,000,000 tokens and per token type: a flat price as a decimal
  string, a tiered one as the price book writes it ({mode, tiers: [{up_to, price}]}); null when the
  model has no price for this tenant (or the price book is unusable).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from billing.errors import BillingError
from billing.price_book import PriceSpec, TierMode
from billing.prices import PriceSource
from metering.clock import Period, utcnow
from metering.events import TOKEN_TYPES
from metering.tenants import Tenant
from serving.openai import capabilities
from serving.settings import ModelSpec

PER_TOKENS = 1_000_000


def price_text(spec: PriceSpec) -> str | dict[str, Any]:
    if spec.mode is TierMode.FLAT:
        return str(spec.tiers[0].price)
    return {"mode": spec.mode.value, "tiers": [{"up_to": t.up_to, "price": str(t.price)} for t in spec.tiers]}


def pricing(prices: PriceSource, tenant: Tenant, model: str, on: date | None = None) -> dict[str, Any] | None:
    """The tenant's prices for `model` in the month of `on` (today), or None when it has none."""
    period = Period.of(on or utcnow().date())
    try:
        resolved = prices.book().select(
            currency=tenant.currency, period_start=period.start, period_end=period.end, tenant_id=tenant.id
        )
    except BillingError:
        return None
    by_type: dict[str, str | dict[str, Any]] = {}
    for token_type in TOKEN_TYPES:
        spec = resolved.prices.get((model, token_type))
        if spec is not None:
            by_type[token_type.value] = price_text(spec)
    if not by_type:
        return None
    return {
        "currency": resolved.currency,
        "per_tokens": PER_TOKENS,
        "price_book_version": resolved.version,
        "contract": resolved.contract_id,
        "prices": by_type,
    }


def card(
    model: str, created: int, spec: ModelSpec | None, tenant: Tenant, prices: PriceSource
) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "tokenport",
        "context_length": spec.max_model_len if spec is not None else None,
        "languages": list(spec.languages) if spec is not None and spec.languages else None,
        # + `tools` where the worker parses tool calls (the catalogue names a tool_call_parser)
        "capabilities": [
            *capabilities.of(spec),
            *(["tools"] if spec is not None and spec.tool_call_parser else []),
        ],
        "pricing": pricing(prices, tenant, model),
    }
