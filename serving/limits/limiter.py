"""Admission by reservation: rate limits and budgets, shared by every gateway process.

    admit   -> the request's worst case is held in every budget and charged to every bucket, or a 429
    settle  -> when its usage event is in the ledger: the hold becomes the actual usage, unused
               tokens go back to the tokens-per-minute buckets
    release -> when it ends without an event (refused before a worker was reached)

A tenant therefore never ends above its budget while workers respect max_tokens and prompts count
within their worst case: every admitted request's worst case was held, atomically, before it was
sent. Holds that are never settled (a process died) expire after the tenant's request timeout plus a
minute. If the backend (Redis) fails, `limits.on_backend_error_budget` (default closed: 503) and
`limits.on_backend_error_rate` (default open) decide.

Open is **bounded to about one limit for the whole fleet**. While Redis answers, every process
beats in it every HEARTBEAT_S (a sorted set of process ids, forgotten after LIVE_TTL_MS of silence)
and remembers how many processes were alive. While Redis cannot be reached, each process counts the
rate limits itself in memory (the `fallback` backend) with buckets of limit / live processes
(rounded up, at least 1) in size and refill, so N processes admit about one limit together, each its
share as counted when Redis last answered (N unknown, never having reached Redis: the whole limit).
Every request tries Redis first, so the shared counts take over again as soon as it answers.

**Rate buckets after Redis lost its state.** Budgets are re-seeded from the ledger the first time a
window is touched; rate buckets are too. A bucket lives in Redis for a day after its last request, so
a bucket Redis does not hold is new or lost; the limiter then reads the tenant's requests and tokens
that started in the last 60 s from the ledger (one grouped query, single flight per tenant in the
process) and the bucket is created at limit - that usage. The script that creates it writes it at
once, so when several processes seed at the same time only the first seed counts (nothing is
subtracted twice) and no marker key is needed; a tenant idle for a day pays one small query. The seed
is a lower bound of the lost bucket's level (whatever it held a minute ago, it refilled at most one
limit since), so after a restart a tenant is never admitted more than one bucket plus refill allows;
it may wait up to a minute longer than the lost bucket would have made it wait, once. Requests in
flight at the loss are not in the ledger yet and are missed (as for budgets). If the ledger cannot
be read, the buckets start full (rate limits are not money; budgets refuse instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeVar

from prometheus_client import Counter, Gauge

from billing.price_book import Tariff
from metering.clock import utcnow
from metering.events import UsageEvent
from metering.metrics import Metrics
from metering.store_sql import UsageStore
from metering.tenants import Tenant
from serving.limits.backend import (
    MINUTE_MS,
    AdmitResult,
    Backend,
    BucketRefund,
    BucketSpec,
    BucketView,
    HoldSettle,
    HoldSpec,
    MemoryBackend,
    refill,
)
from serving.limits.cache import PolicyCache
from serving.limits.errors import LimitsUnavailable, ModelNotPriced, QuotaExceeded, RateLimitExceeded
from serving.limits.policy import Budget, Defaults, Effective, combine
from serving.limits.pricing import PriceBookPricer, Pricer, PriceUnavailable, billed_counts, cost_units

log = logging.getLogger("tokenport.limits")
HOLD_MARGIN_MS = 60_000
DAY_MS = 86_400_000
SETTLE_RETRIES = (0.2, 1.0, 3.0, 10.0)
GAUGE_EVERY_S = 1.0
HEARTBEAT_S = 2.0  # each process marks itself alive in Redis this often
LIVE_TTL_MS = 6_000  # a process silent this long is no longer counted
FailMode = Literal["open", "closed"]
T = TypeVar("T")


async def _single_flight(
    table: dict[str, asyncio.Future[T]], key: str, read: Callable[[], Awaitable[T]]
) -> T:
    """`read()` once per key at a time in this process: concurrent callers wait for the same answer."""
    fut = table.get(key)
    if fut is not None:
        return await asyncio.shield(fut)
    fut = asyncio.get_running_loop().create_future()
    table[key] = fut
    try:
        value = await read()
        fut.set_result(value)
        return value
    except BaseException as exc:
        fut.set_exception(exc)
        fut.exception()  # retrieved: waiters re-raise it
        raise
    finally:
        table.pop(key, None)


def duration(ms: int) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(math.ceil(seconds), 60)
    return f"{m}m{s}s"


def rate_headers(views: list[BucketView]) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} from the tightest bucket of each kind."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        mine = [v for v in views if v.kind == kind]
        if not mine:
            continue
        v = min(mine, key=lambda b: (b.remaining, -b.reset_ms))
        headers[f"x-ratelimit-limit-{kind}"] = str(v.capacity)
        headers[f"x-ratelimit-remaining-{kind}"] = str(v.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = duration(v.reset_ms)
    return headers


@dataclass(frozen=True, slots=True)
class HeldBudget:
    spec: HoldSpec
    budget: Budget
    scope: Literal["tenant", "key"]


@dataclass(slots=True)
class Admission:
    request_id: str
    tenant: Tenant
    key_id: str
    model: str
    timeout_s: float
    worst_tokens: int = 0
    buckets: list[BucketSpec] = field(default_factory=list)
    holds: list[HeldBudget] = field(default_factory=list)
    epochs: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    degraded: bool = False  # admitted without the backend (fail-open)
    created: float = field(default_factory=time.monotonic)
    done: bool = False

    @property
    def tracked(self) -> bool:
        return bool(self.buckets or self.holds)


class Limiter:
    def __init__(
        self,
        backend: Backend,
        policies: PolicyCache,
        usage: UsageStore,
        metrics: Metrics,
        *,
        defaults: Defaults,
        pricer: Pricer | None = None,
        on_error_budget: FailMode = "closed",
        on_error_rate: FailMode = "open",
        clock: Callable[[], float] = time.time,
        fallback: Backend | None = None,
    ) -> None:
        self.backend = backend
        self.fallback = fallback  # rate limits counted per process while the backend is down
        self.policies = policies
        self.usage = usage
        self.metrics = metrics
        self.defaults = defaults
        self.pricer = pricer
        self.on_error_budget = on_error_budget
        self.on_error_rate = on_error_rate
        self.clock = clock
        self._tracked: dict[str, Admission] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seeding: dict[str, asyncio.Future[int]] = {}
        self._rate_seeding: dict[str, asyncio.Future[dict[str, tuple[int, int]]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._heart: asyncio.Task[None] | None = None
        self.member = secrets.token_hex(8)  # this process in Redis's set of live gateways
        self.live = 1  # gateway processes alive when Redis last answered (1 until it has)
        # bucket key -> (its level in Redis after this process's last admission there, when): where
        # this process's share starts while Redis is away (not full: that was a whole extra bucket)
        self._levels: dict[str, tuple[int, int]] = {}
        self._gauged: dict[str, float] = {}
        r = metrics.registry
        self.rejections = Counter(
            "tokenport_limit_rejections", "Requests refused by limits, by reason.", ["reason"], registry=r
        )
        self.backend_errors = Counter(
            "tokenport_limits_backend_errors",
            "Failed calls to the limits backend (Redis), by operation.",
            ["op"],
            registry=r,
        )
        self.live_gauge = Gauge(
            "tokenport_limits_live_processes",
            "Gateway processes alive in Redis at this process's last heartbeat; while Redis is away each "
            "process admits this share (1/N) of every rate limit.",
            registry=r,
        )
        self.live_gauge.set(1)
        for reason in ("requests", "tokens", "budget", "unavailable"):
            self.rejections.labels(reason)
        for op in ("admit", "settle"):
            self.backend_errors.labels(op)

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="limits-sweeper")
        if self.fallback is not None:  # only a shared backend has a fleet to count
            self._heart = asyncio.create_task(self._heartbeats(), name="limits-heartbeat")

    async def close(self) -> None:
        await self.drain()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._heart is not None:
            self._heart.cancel()
            self._heart = None
        if self.fallback is not None:
            with contextlib.suppress(Exception):  # leave the count now, not after LIVE_TTL_MS
                await self.backend.leave(self.member)
        await self.backend.close()

    async def beat(self) -> int:
        """One heartbeat: mark this process alive in the backend and remember how many are (the
        divisor of the rate limits while the backend is away). Keeps the last count if it fails."""
        try:
            self.live = max(1, await self.backend.heartbeat(self.member, LIVE_TTL_MS))
        except Exception:  # noqa: BLE001 - Redis away: the last count stands
            return self.live
        self.live_gauge.set(self.live)
        return self.live

    async def _heartbeats(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(HEARTBEAT_S)

    def share(self, capacity: int) -> int:
        """This process's part of a rate limit while the backend is away."""
        return max(1, math.ceil(capacity / self.live))

    def _fallback_bucket(self, b: BucketSpec, now_ms: int) -> BucketSpec:
        """The bucket this process counts while the backend is away: its share of the capacity,
        starting at its share of the level Redis last showed it (refilled since), not full."""
        cap = self.share(b.capacity)
        last = self._levels.get(b.key)
        if last is None:
            return replace(b, capacity=cap, seed=0)
        level = refill(last[0], last[1], b.capacity, now_ms)
        return replace(b, capacity=cap, seed=max(0, cap - math.floor(level / self.live)))

    def _remember_levels(self, buckets: list[BucketSpec], result: AdmitResult, now_ms: int) -> None:
        if len(self._levels) > 100_000:  # a bound, not a limit: forget and learn again
            self._levels.clear()
        for b, v in zip(buckets, result.buckets, strict=False):
            self._levels[b.key] = (v.remaining, now_ms)

    async def drain(self) -> None:
        """Wait until every scheduled settle has run (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(30)
            now = time.monotonic()
            for rid, adm in list(self._tracked.items()):
                if now - adm.created > adm.timeout_s + HOLD_MARGIN_MS / 1000:
                    self._tracked.pop(rid, None)  # its holds have expired in the backend
            for b in (self.backend, self.fallback):
                if isinstance(b, MemoryBackend):
                    b.forget_idle(self._now_ms())

    # --- policy --------------------------------------------------------------------------
    def effective(self, tenant_id: str, key_id: str) -> Effective:
        return combine(self.policies.tenant(tenant_id), self.policies.key(key_id), self.defaults)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _hold_key(self, tenant_id: str, scope: str, budget: Budget, now: datetime) -> str:
        window, _start = budget.window(now)
        return f"tp:{{{tenant_id}}}:bg:{scope}:{window}:{budget.unit}"

    def _amount(
        self,
        budget: Budget,
        tenant: Tenant,
        model: str,
        *,
        prompt: int | Decimal,
        cached: int | Decimal,
        completion: int | Decimal,
    ) -> int:
        if budget.unit == "tokens":
            return int(prompt + completion)
        if self.pricer is None:
            raise ModelNotPriced(
                "This tenant has a money budget but the gateway has no price book.", param="model"
            )
        try:
            return cost_units(
                self.pricer,
                model,
                tenant.currency,
                tenant.id,
                input_tokens=prompt - cached,
                cached_tokens=cached,
                output_tokens=completion,
            )
        except PriceUnavailable as exc:
            raise ModelNotPriced(
                f"The model '{model}' has no {tenant.currency} price, so your money budget "
                f"cannot cover it ({exc}).",
                param="model",
            ) from exc

    def _seed_events(self, budget: Budget, tenant: Tenant, scope: str, key_id: str, start: datetime) -> int:
        return sum(
            self._event_amount(budget, tenant, s.event)
            for s in self.usage.iter_events(tenant_id=tenant.id, start=start)
            if scope != "key" or s.event.key_id == key_id
        )

    def _hold_factor(self, budget: Budget, tenant: Tenant, model: str) -> Decimal:
        convert = (
            self.pricer.converter(tenant.id, tenant.currency)
            if budget.unit != "tokens" and isinstance(self.pricer, PriceBookPricer)
            else None
        )
        return convert.hold_factor(model, utcnow().date()) if convert is not None else Decimal(1)

    def _event_amount(self, budget: Budget, tenant: Tenant, event: UsageEvent) -> int:
        """What an event costs the budget: tokens, or money for the units its invoice bills (the tariff)."""
        if budget.unit == "tokens":
            return event.prompt_tokens + event.completion_tokens
        fresh, cached, out = billed_counts(self.pricer, tenant.id, tenant.currency, event)
        return self._amount(budget, tenant, event.model, prompt=fresh + cached, cached=cached, completion=out)

    def _tariffed(self, budget: Budget, tenant: Tenant) -> bool:
        if budget.unit == "tokens" or not isinstance(self.pricer, PriceBookPricer):
            return False
        convert = self.pricer.converter(tenant.id, tenant.currency)
        return convert is not None and convert.tariff_on(utcnow().date()) is not Tariff.TOKENS

    async def _seed(self, tenant: Tenant, scope: str, key_id: str, budget: Budget, hold_key: str) -> int:
        """Usage of the budget's window from the ledger (single flight per window in this process)."""
        read = lambda: self._read_seed(tenant, scope, key_id, budget)  # noqa: E731
        return await _single_flight(self._seeding, hold_key, read)

    async def _read_seed(self, tenant: Tenant, scope: str, key_id: str, budget: Budget) -> int:
        _window, start = budget.window(datetime.fromtimestamp(self.clock(), UTC))
        if self._tariffed(budget, tenant):  # billed units per event, as the invoice converts them
            return await asyncio.to_thread(self._seed_events, budget, tenant, scope, key_id, start)
        group = ["key_id", "model"] if scope == "key" else ["model"]
        rows = await asyncio.to_thread(self.usage.summary, group, tenant_id=tenant.id, start=start)
        total = 0
        for r in rows:
            if scope == "key" and r["key_id"] != key_id:
                continue
            prompt, cached, completion = (
                int(str(r["prompt_tokens"])),
                int(str(r["cached_prompt_tokens"])),
                int(str(r["completion_tokens"])),
            )
            total += self._amount(
                budget, tenant, str(r["model"]), prompt=prompt, cached=cached, completion=completion
            )
        return total

    async def _seed_buckets(self, adm: Admission) -> list[BucketSpec]:
        """The admission's buckets with their seeds: requests and tokens of the last minute."""
        try:
            by_key = await self._recent_usage(adm.tenant.id)
        except Exception as exc:  # noqa: BLE001 - the ledger is away: buckets start full
            log.warning("cannot read the last minute's usage of %s from the ledger: %s", adm.tenant.id, exc)
            by_key = {}
        seeded = []
        for b in adm.buckets:
            rows = [u for k, u in by_key.items() if b.scope == "tenant" or k == adm.key_id]
            used = sum(u[0] if b.kind == "requests" else u[1] for u in rows)
            seeded.append(replace(b, seed=used))
        return seeded

    async def _recent_usage(self, tenant_id: str) -> dict[str, tuple[int, int]]:
        """Per key of the tenant: (requests, tokens) that started in the last 60 s (single flight)."""
        return await _single_flight(self._rate_seeding, tenant_id, lambda: self._read_recent(tenant_id))

    async def _read_recent(self, tenant_id: str) -> dict[str, tuple[int, int]]:
        start = datetime.fromtimestamp(self.clock(), UTC) - timedelta(milliseconds=MINUTE_MS)
        rows = await asyncio.to_thread(self.usage.summary, ["key_id"], tenant_id=tenant_id, start=start)
        return {
            str(r["key_id"]): (
                int(str(r["requests"])),
                int(str(r["prompt_tokens"])) + int(str(r["completion_tokens"])),
            )
            for r in rows
        }

    # --- admission -----------------------------------------------------------------------
    async def admit(
        self,
        tenant: Tenant,
        key_id: str,
        request_id: str,
        model: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        effective: Effective | None = None,
    ) -> Admission:
        eff = effective or self.effective(tenant.id, key_id)
        adm = Admission(
            request_id=request_id,
            tenant=tenant,
            key_id=key_id,
            model=model,
            timeout_s=eff.timeout_s,
            worst_tokens=prompt_tokens + completion_tokens,
        )
        if eff.unlimited:
            return adm
        now_ms = self._now_ms()
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        t = f"tp:{{{tenant.id}}}:rl"
        for scope, prefix, rpm, tpm in (
            ("tenant", f"{t}:t", eff.tenant_rpm, eff.tenant_tpm),
            ("key", f"{t}:k:{key_id}", eff.key_rpm, eff.key_tpm),
        ):
            # seed=None: a bucket the backend lost (or never had) is created from the ledger
            if rpm is not None:
                adm.buckets.append(BucketSpec(prefix + ":rpm", rpm, 1, "requests", scope, None))  # type: ignore[arg-type]
            if tpm is not None:
                adm.buckets.append(BucketSpec(prefix + ":tpm", tpm, adm.worst_tokens, "tokens", scope, None))  # type: ignore[arg-type]
        ttl_ms = int(eff.timeout_s * 1000) + HOLD_MARGIN_MS
        for scope, budget in (("tenant", eff.tenant_budget), ("key", eff.key_budget)):
            if budget is None:
                continue
            f = self._hold_factor(budget, tenant, model)  # a token may bill more than one unit (tariffs)
            amount = self._amount(
                budget,
                tenant,
                model,
                prompt=math.ceil(prompt_tokens * f),
                cached=0,
                completion=math.ceil(completion_tokens * f),
            )
            key_ttl = (40 if budget.period == "month" else 400) * DAY_MS
            scope_key = "t" if scope == "tenant" else f"k:{key_id}"
            spec = HoldSpec(
                self._hold_key(tenant.id, scope_key, budget, now),
                budget.limit_units(),
                amount,
                ttl_ms,
                None,
                key_ttl,
                scope,  # type: ignore[arg-type]
            )
            adm.holds.append(HeldBudget(spec, budget, scope))  # type: ignore[arg-type]
        if not adm.tracked:
            return adm  # only caps apply (checked by the guard)
        result = await self._admit(adm, now_ms)
        if result is None:
            return adm  # degraded: admitted without counting
        adm.epochs = result.epochs
        adm.headers = rate_headers(result.buckets)
        self._tracked[request_id] = adm
        return adm

    async def _admit(self, adm: Admission, now_ms: int) -> AdmitResult | None:
        specs = [h.spec for h in adm.holds]
        for _attempt in range(5):  # at most: seed two budgets, seed the buckets, admit
            try:
                result = await self.backend.admit(
                    adm.request_id, now_ms, adm.buckets, specs, secrets.token_hex(6)
                )
            except Exception as exc:  # noqa: BLE001 - Redis down or slow: the fail mode decides
                buckets = adm.buckets
                self._backend_failed(adm, exc)  # raises when closed; else admitted uncounted by Redis
                if self.fallback is not None and buckets:  # bounded: this process counts its share
                    mine = [self._fallback_bucket(b, now_ms) for b in buckets]
                    local = await self.fallback.admit(adm.request_id, now_ms, mine, [], secrets.token_hex(6))
                    if local.status == "rate":
                        adm.buckets = buckets
                        if (
                            local.retry_after_ms is None
                            and buckets[local.index].cost <= buckets[local.index].capacity
                        ):
                            local.retry_after_ms = MINUTE_MS  # larger than the share, not than the limit
                        self._refuse_rate(adm, local)
                    adm.headers = rate_headers(local.buckets)
                return None
            if self.fallback is not None:  # ok or rate: the levels the buckets have in Redis now
                self._remember_levels(adm.buckets, result, now_ms)
            if result.status == "ok":
                return result
            if result.status == "need_rate_seed":
                adm.buckets = await self._seed_buckets(adm)
                continue
            if result.status == "need_seed":
                held = adm.holds[result.index]
                try:
                    seed = await self._seed(adm.tenant, held.scope, adm.key_id, held.budget, held.spec.key)
                except ModelNotPriced:
                    raise
                except Exception as exc:
                    log.error("cannot read budget usage from the ledger: %s", exc)
                    self.rejections.labels("unavailable").inc()
                    raise LimitsUnavailable("Budgets cannot be checked right now; retry shortly.") from exc
                specs[result.index] = HoldSpec(**{**_fields(held.spec), "seed": seed})
                adm.holds[result.index] = HeldBudget(specs[result.index], held.budget, held.scope)
                continue
            if result.status == "rate":
                self._refuse_rate(adm, result)
            self._refuse_budget(adm, result)
        raise LimitsUnavailable("Budgets cannot be checked right now; retry shortly.")

    def _backend_failed(self, adm: Admission, exc: Exception) -> None:
        self.backend_errors.labels("admit").inc()
        log.error("limits backend failed at admission (%s: %s)", type(exc).__name__, exc)
        if adm.holds:  # a timeout may come after Redis ran the script: drop any hold it made
            self._spawn(self._forget(adm.request_id, [HoldSettle(h.spec.key, None, "") for h in adm.holds]))
        if (adm.holds and self.on_error_budget == "closed") or (
            adm.buckets and self.on_error_rate == "closed"
        ):
            self.rejections.labels("unavailable").inc()
            raise LimitsUnavailable(
                "Rate limits and budgets cannot be checked right now; retry shortly."
            ) from exc
        adm.degraded = True
        adm.buckets, adm.holds = [], []

    async def _forget(self, rid: str, holds: list[HoldSettle]) -> None:
        await asyncio.sleep(1.0)
        try:
            await self.backend.settle(rid, self._now_ms(), holds, [])
        except Exception:  # noqa: BLE001 - the holds expire on their own
            self.backend_errors.labels("settle").inc()

    def _refuse_rate(self, adm: Admission, result: AdmitResult) -> None:
        b = adm.buckets[result.index]
        headers = rate_headers(result.buckets)
        self.rejections.labels(b.kind).inc()
        per = "RPM" if b.kind == "requests" else "TPM"
        who = "organization" if b.scope == "tenant" else "API key"
        if result.retry_after_ms is None:
            raise RateLimitExceeded(
                f"Request too large: it may use up to {b.cost} tokens but the {who} limit is {b.capacity} "
                f"tokens per min (TPM). Lower max_tokens or shorten the prompt.",
                headers=headers,
            )
        wait = result.retry_after_ms
        headers["retry-after"] = str(max(1, math.ceil(wait / 1000)))
        headers["retry-after-ms"] = str(wait)
        raise RateLimitExceeded(
            f"Rate limit reached for {adm.model} in {who} on {b.kind} per min ({per}): Limit {b.capacity}, "
            f"Requested {b.cost}. Please try again in {duration(wait)}.",
            headers=headers,
        )

    def _refuse_budget(self, adm: Admission, result: AdmitResult) -> None:
        held = adm.holds[result.index]
        b, spec = held.budget, held.spec
        self.rejections.labels("budget").inc()
        whose = "your organization's" if held.scope == "tenant" else "this API key's"
        cur = f" {adm.tenant.currency}" if b.unit == "money" else ""
        period = "this month" if b.period == "month" else "prepaid balance"
        raise QuotaExceeded(
            f"You exceeded your current quota: {whose} budget ({period}) is {b.show(spec.limit)}{cur}, "
            f"{b.show(result.used)}{cur} used and {b.show(result.reserved)}{cur} held by requests in flight; "
            f"this request may use up to {b.show(spec.amount)}{cur}. Lower max_tokens, or ask for a higher "
            "budget."
        )

    # --- the end of a request --------------------------------------------------------------
    def on_event(self, event: UsageEvent) -> None:
        """Recorder hook: the event is in the ledger; settle the request's holds with its usage."""
        adm = self._tracked.pop(event.request_id, None)
        if adm is None or adm.done:
            return
        adm.done = True
        if not adm.holds and isinstance(self.backend, MemoryBackend):  # rate limits only, in-process: no task
            self.backend.settle_now(adm.request_id, self._now_ms(), [], self._refunds(adm, event))
            return
        self._spawn(self._settle(adm, event))

    def on_lost(self, event: UsageEvent) -> None:
        """Recorder hook: the ledger refused the request's event, so nothing was billed: drop its holds
        now instead of when they expire (a database outage would otherwise block budgets for minutes)."""
        adm = self._tracked.get(event.request_id)
        if adm is not None:
            self.release(adm)

    def release(self, adm: Admission) -> None:
        """The request ended without a usage event (refused before any worker): drop its holds."""
        self._tracked.pop(adm.request_id, None)
        if adm.done or not adm.tracked:
            return
        adm.done = True
        self._spawn(self._settle(adm, None))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _refunds(adm: Admission, event: UsageEvent | None) -> list[BucketRefund]:
        """Token buckets were charged the worst case: give back what the request did not use."""
        actual_tokens = 0 if event is None else event.prompt_tokens + event.completion_tokens
        return [
            BucketRefund(b.key, b.capacity, b.cost - actual_tokens)
            for b in adm.buckets
            if b.kind == "tokens" and b.cost != actual_tokens
        ]

    async def _settle(self, adm: Admission, event: UsageEvent | None) -> None:
        holds: list[HoldSettle] = []
        for i, h in enumerate(adm.holds):
            actual: int | None = None
            if event is not None:
                try:
                    actual = self._event_amount(h.budget, adm.tenant, event)
                except ModelNotPriced:
                    actual = h.spec.amount  # priced at admission; keep the hold as the charge
            if actual is not None and actual > h.spec.amount:
                log.warning(
                    "request %s used %d > its hold %d (%s budget of %s)",
                    adm.request_id,
                    actual,
                    h.spec.amount,
                    h.scope,
                    adm.tenant.id,
                )
            epoch = adm.epochs[i] if i < len(adm.epochs) else ""
            holds.append(HoldSettle(h.spec.key, actual, epoch))
        refunds = self._refunds(adm, event)
        for delay in (*SETTLE_RETRIES, None):
            try:
                await self.backend.settle(adm.request_id, self._now_ms(), holds, refunds)
                break
            except Exception as exc:  # noqa: BLE001 - retry; holds expire on their own if all fail
                self.backend_errors.labels("settle").inc()
                if delay is None:
                    log.error("could not settle %s in the limits backend: %s", adm.request_id, exc)
                    return
                await asyncio.sleep(delay)
        for h in adm.holds:
            if h.scope == "tenant":
                await self._gauge(adm.tenant.id, h)

    async def _gauge(self, tenant_id: str, h: HeldBudget) -> None:
        now = time.monotonic()
        if now - self._gauged.get(tenant_id, 0.0) < GAUGE_EVERY_S:
            return  # at most one status read per tenant per second
        self._gauged[tenant_id] = now
        try:
            st = await self.backend.status(h.spec.key, self._now_ms())
        except Exception:  # noqa: BLE001 - only a gauge
            return
        limit = h.spec.limit
        ratio = st.used / limit if limit > 0 else (1.0 if st.used else 0.0)
        self.metrics.budget_used.labels(self.metrics.tenant_label(tenant_id)).set(ratio)

    # --- status (admin) ------------------------------------------------------------------
    async def budget_status(self, tenant: Tenant, key_id: str | None = None) -> dict[str, Any] | None:
        pol = self.policies.key(key_id) if key_id else self.policies.tenant(tenant.id)
        if pol is None or pol.budget is None:
            return None
        b = pol.budget
        now = datetime.fromtimestamp(self.clock(), UTC)
        scope_key = f"k:{key_id}" if key_id else "t"
        hold_key = self._hold_key(tenant.id, scope_key, b, now)
        try:
            st = await self.backend.status(hold_key, self._now_ms())
        except Exception as exc:  # Redis down
            raise LimitsUnavailable("The budget cannot be read right now; retry shortly.") from exc
        used = st.used
        if not st.seeded:
            used = await self._seed(tenant, "key" if key_id else "tenant", key_id or "", b, hold_key)
        _window, start = b.window(now)
        unit = b.unit if b.unit == "tokens" else tenant.currency
        limit = b.limit_units()
        return {
            "unit": unit,
            "period": b.period,
            "since": start.isoformat(),
            "limit": b.number(limit),
            "used": b.number(used),
            "held": b.number(st.reserved),
            "remaining": b.number(max(0, limit - used - st.reserved)),
            "requests_in_flight": st.holds,
        }


def _fields(spec: HoldSpec) -> dict[str, Any]:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}
