"""Builds the guardrails of one gateway process (called by create_app; no work at import time)."""

from __future__ import annotations

from dataclasses import dataclass

from metering.metrics import Metrics
from metering.tokencount import TokenCounter
from serving.content_log import ContentLogger, ContentLogStore
from serving.limits.backend import Backend, MemoryBackend
from serving.limits.cache import PolicyCache
from serving.limits.guard import Guard
from serving.limits.limiter import Limiter
from serving.limits.policy import Defaults
from serving.limits.pricing import PriceBookPricer
from serving.limits.store import LimitsStore
from serving.limits.tokens import PromptCounter
from serving.response_store import ResponseStore
from serving.services import Stores
from serving.settings import Settings


@dataclass(frozen=True)
class Guardrails:
    store: LimitsStore
    policies: PolicyCache
    limiter: Limiter
    guard: Guard
    content: ContentLogger

    async def start(self) -> None:
        await self.policies.start()
        await self.limiter.start()
        await self.content.start()

    async def close(self) -> None:
        await self.content.close()
        await self.limiter.close()
        await self.policies.close()


def build_guardrails(
    settings: Settings, stores: Stores, metrics: Metrics, tokens: TokenCounter | None = None
) -> Guardrails:
    lim = settings.limits
    backend: Backend
    if lim.backend == "redis":
        from serving.limits.redis_backend import RedisBackend

        backend = RedisBackend(lim.redis_url, timeout_s=lim.redis_timeout_s)
    else:
        backend = MemoryBackend()
    store = stores.limits
    policies = PolicyCache(store, stores.tenants.version, settings.gateway.key_cache_refresh_s)
    defaults = Defaults(
        rpm=lim.default_rpm,
        tpm=lim.default_tpm,
        max_tokens=lim.default_max_tokens,
        max_prompt_tokens=lim.default_max_prompt_tokens,
        request_timeout_s=settings.gateway.request_timeout_s,
    )
    limiter = Limiter(
        backend,
        policies,
        stores.usage,
        metrics,
        defaults=defaults,
        pricer=PriceBookPricer(stores.prices),
        on_error_budget=lim.on_backend_error_budget,
        on_error_rate=lim.on_backend_error_rate,
        fallback=MemoryBackend() if lim.backend == "redis" else None,  # bounded fail-open
    )

    def context_length(model: str) -> int:
        spec = settings.catalogue.get(model)
        return spec.max_model_len if spec is not None else lim.unknown_model_context

    def content_policy(tenant_id: str) -> tuple[bool, int]:
        p = policies.tenant(tenant_id)
        if p is None or not p.content_logging:
            return False, 0
        return True, p.content_retention_days or lim.content_retention_days

    content = ContentLogger(
        ContentLogStore(stores.engine), content_policy, responses=ResponseStore(stores.engine)
    )
    gw = settings.gateway
    guard = Guard(
        limiter,
        PromptCounter(settings.models_dir, tokens),
        context_length,
        content,
        max_depth=gw.max_json_depth,
        max_values=gw.max_json_values,
        max_keys=gw.max_json_keys,
    )
    return Guardrails(store=store, policies=policies, limiter=limiter, guard=guard, content=content)
