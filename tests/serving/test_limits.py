"""Unit tests of the admission algorithm and its parts, on both backends (in-process and Redis).

Time is passed in explicitly (now_ms), so refill and expiry are exact; Redis is Debian's redis-server
started for the session (tests/redis_fixture.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from billing.prices import load_price_source
from metering.events import TokenType
from serving.limits.backend import BucketRefund, BucketSpec, HoldSettle, HoldSpec, MemoryBackend
from serving.limits.limiter import duration, rate_headers
from serving.limits.policy import Budget, Defaults, LimitPolicy, combine
from serving.limits.pricing import PriceBookPricer, PriceUnavailable, StaticPricer, cost_units, to_micro
from serving.limits.redis_backend import RedisBackend
from serving.limits.tokens import PromptCounter
from tests import redis_fixture
from tests.redis_fixture import RedisServer

redis_server = redis_fixture.redis_server  # the fixture, for this module

REPO = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000_000  # ms


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    b = RedisBackend(server.url)
    try:
        yield b
    finally:
        await b.close()


def ns() -> str:
    return "tp:{t" + uuid.uuid4().hex[:8] + "}"


def rpm(key: str, cap: int, scope: str = "tenant") -> BucketSpec:
    return BucketSpec(key + ":rpm", cap, 1, "requests", scope)  # type: ignore[arg-type]


def hold(key: str, limit: int, amount: int, seed: int | None = 0, ttl_ms: int = 60_000) -> HoldSpec:
    return HoldSpec(key + ":bg", limit, amount, ttl_ms, seed, 3_600_000, "tenant")


async def test_requests_per_minute_bucket_refills_continuously(backend: Any) -> None:
    k = ns()
    results = [await backend.admit(f"r{i}", T0, [rpm(k, 3)], [], "e") for i in range(4)]
    assert [r.status for r in results] == ["ok", "ok", "ok", "rate"]
    assert [r.buckets[0].remaining for r in results[:3]] == [2, 1, 0]
    assert results[2].buckets[0].reset_ms == 60_000  # empty: a full minute to be full again
    assert results[3].retry_after_ms == 20_000  # one request comes back every 20 s
    assert (await backend.admit("r5", T0 + 19_000, [rpm(k, 3)], [], "e")).status == "rate"
    ok = await backend.admit("r6", T0 + 20_000, [rpm(k, 3)], [], "e")
    assert ok.status == "ok" and ok.buckets[0].remaining == 0


async def test_all_buckets_must_admit_and_none_is_charged_on_refusal(backend: Any) -> None:
    k = ns()
    wide, narrow = rpm(k + ":a", 100), rpm(k + ":b", 1)
    assert (await backend.admit("r1", T0, [wide, narrow], [], "e")).status == "ok"
    refused = await backend.admit("r2", T0, [wide, narrow], [], "e")
    assert refused.status == "rate" and refused.index == 1
    assert refused.buckets[0].remaining == 99  # the wide bucket was not charged for the refusal


async def test_tokens_bucket_refuses_a_request_larger_than_the_limit_for_good(backend: Any) -> None:
    k = ns()
    tpm = BucketSpec(k + ":tpm", 1000, 1500, "tokens", "key")
    r = await backend.admit("r1", T0, [tpm], [], "e")
    assert r.status == "rate" and r.retry_after_ms is None


async def test_unused_tokens_are_given_back_at_settle(backend: Any) -> None:
    k = ns()
    tpm = BucketSpec(k + ":tpm", 1000, 600, "tokens", "tenant")
    assert (await backend.admit("r1", T0, [tpm], [], "e")).status == "ok"
    assert (await backend.admit("r2", T0, [tpm], [], "e")).status == "rate"
    await backend.settle("r1", T0, [], [BucketRefund(tpm.key, 1000, 600 - 100)])  # used 100 of 600
    r = await backend.admit("r3", T0, [tpm], [], "e")
    assert r.status == "ok" and r.buckets[0].remaining == 300


async def test_budget_hold_needs_a_seed_then_holds_worst_cases(backend: Any) -> None:
    k = ns()
    assert (await backend.admit("r0", T0, [], [hold(k, 100, 30, seed=None)], "e1")).status == "need_seed"
    first = await backend.admit("r1", T0, [], [hold(k, 100, 30, seed=10)], "e1")
    assert first.status == "ok" and first.epochs == ["e1"]
    assert (await backend.admit("r2", T0, [], [hold(k, 100, 30, seed=None)], "e2")).epochs == ["e1"]
    assert (await backend.admit("r3", T0, [], [hold(k, 100, 30, seed=None)], "e2")).status == "ok"  # 10+90
    refused = await backend.admit("r4", T0, [], [hold(k, 100, 1, seed=None)], "e2")
    assert (refused.status, refused.used, refused.reserved) == ("budget", 10, 90)
    await backend.settle("r1", T0, [HoldSettle(k + ":bg", 12, "e1")], [])
    st = await backend.status(k + ":bg", T0)
    assert (st.used, st.reserved, st.holds) == (22, 60, 2)
    await backend.settle("r2", T0, [HoldSettle(k + ":bg", None, "e1")], [])  # released: nothing used
    st = await backend.status(k + ":bg", T0)
    assert (st.used, st.reserved, st.holds) == (22, 30, 1)
    await backend.settle("r2", T0, [HoldSettle(k + ":bg", None, "e1")], [])  # twice: no effect
    assert (await backend.status(k + ":bg", T0)).reserved == 30


async def test_a_hold_never_settled_expires(backend: Any) -> None:
    k = ns()
    assert (await backend.admit("r1", T0, [], [hold(k, 50, 50, ttl_ms=1000)], "e")).status == "ok"
    assert (await backend.admit("r2", T0 + 999, [], [hold(k, 50, 50, ttl_ms=1000)], "e")).status == "budget"
    assert (await backend.admit("r3", T0 + 1000, [], [hold(k, 50, 50, ttl_ms=1000)], "e")).status == "ok"
    # The late settle of the expired hold still counts its usage (the hold itself is gone).
    await backend.settle("r1", T0 + 1500, [HoldSettle(k + ":bg", 7, "e")], [])
    st = await backend.status(k + ":bg", T0 + 1500)
    assert (st.used, st.reserved) == (7, 50)


async def test_concurrent_admissions_never_exceed_the_budget(backend: Any) -> None:
    k = ns()
    results = await asyncio.gather(
        *(backend.admit(f"r{i}", T0, [], [hold(k, 1000, 70)], "e") for i in range(200))
    )
    assert sum(r.status == "ok" for r in results) == 1000 // 70


async def test_two_redis_clients_share_one_budget(redis_server: RedisServer) -> None:
    """Two gateway processes = two clients of one Redis: the budget is held once for both."""
    a, b = RedisBackend(redis_server.url), RedisBackend(redis_server.url)
    k = ns()
    try:
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).admit(f"r{i}", T0, [rpm(k, 1000)], [hold(k, 500, 9)], "e")
                for i in range(300)
            )
        )
        assert sum(r.status == "ok" for r in results) == 500 // 9
        st = await a.status(k + ":bg", T0)
        assert st.reserved == 9 * (500 // 9) and st.holds == 500 // 9
    finally:
        await a.close()
        await b.close()


async def test_after_a_redis_state_loss_settles_of_old_holds_do_not_double_count(
    redis_server: RedisServer,
) -> None:
    b = RedisBackend(redis_server.url)
    k = ns()
    try:
        ok = await b.admit("r1", T0, [], [hold(k, 100, 10, seed=0)], "old")
        await b.client.delete(k + ":bg", k + ":bg:r", k + ":bg:x")  # Redis lost the window
        # Re-seeded from the ledger, which already holds r1's usage (5): the late settle must not add it
        # again.
        assert (await b.admit("r2", T0, [], [hold(k, 100, 10, seed=5)], "new")).status == "ok"
        await b.settle("r1", T0, [HoldSettle(k + ":bg", 5, ok.epochs[0])], [])
        st = await b.status(k + ":bg", T0)
        assert (st.used, st.reserved) == (5, 10)
    finally:
        await b.close()


async def test_a_redis_restart_fails_no_admission_on_the_dead_pooled_connections(tmp_path: Path) -> None:
    """After Redis restarts, every connection left in the pool is dead: each is replaced on its first
    use, not returned to a request as a ConnectionError (a 503 under the default fail-closed budget)."""
    server = RedisServer(redis_fixture._free_port(), tmp_path).start()
    b = RedisBackend(server.url)
    k = ns()
    try:
        before = await asyncio.gather(*(b.admit(f"a{i}", T0, [rpm(k, 1000)], [], "e") for i in range(20)))
        assert all(r.status == "ok" for r in before)
        server.stop()
        server.start()  # the same port, empty
        after = await asyncio.gather(
            *(b.admit(f"b{i}", T0, [rpm(k, 1000)], [hold(k, 100, 1)], "e") for i in range(20)),
            return_exceptions=True,
        )
        assert [r if isinstance(r, BaseException) else r.status for r in after] == ["ok"] * 20
    finally:
        await b.close()
        server.stop()


async def test_a_replayed_admission_holds_its_amount_once(redis_server: RedisServer) -> None:
    """An ADMIT sent again after its reply was lost (the retry above) must not hold the budget twice."""
    b = RedisBackend(redis_server.url)
    k = ns()
    try:
        for _ in range(2):
            assert (await b.admit("r1", T0, [], [hold(k, 100, 10)], "e")).status == "ok"
        st = await b.status(k + ":bg", T0)
        assert (st.reserved, st.holds) == (10, 1)
        await b.settle("r1", T0, [HoldSettle(k + ":bg", 7, "")], [])
        st = await b.status(k + ":bg", T0)
        assert (st.used, st.reserved, st.holds) == (7, 0, 0)
    finally:
        await b.close()


# --- the parts around the algorithm ----------------------------------------------------------
def test_reset_durations_use_openai_format() -> None:
    assert [duration(x) for x in (0, 17, 1000, 1500, 59_180, 60_000, 360_000)] == [
        "0ms",
        "17ms",
        "1s",
        "1.5s",
        "59.2s",
        "1m0s",
        "6m0s",
    ]


def test_headers_report_the_tightest_bucket_of_each_kind() -> None:
    from serving.limits.backend import BucketView

    views = [
        BucketView(100, 90, 6000, "requests", "tenant"),
        BucketView(10, 2, 48_000, "requests", "key"),
        BucketView(5000, 4000, 12_000, "tokens", "tenant"),
    ]
    assert rate_headers(views) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "48s",
        "x-ratelimit-limit-tokens": "5000",
        "x-ratelimit-remaining-tokens": "4000",
        "x-ratelimit-reset-tokens": "12s",
    }


def test_policies_combine_tenant_key_and_defaults() -> None:
    d = Defaults(rpm=600, tpm=None, max_tokens=4096, max_prompt_tokens=None, request_timeout_s=600)
    budget = Budget("tokens", Decimal(1000), "month")
    eff = combine(
        LimitPolicy(tpm=50_000, budget=budget, max_tokens=8192, request_timeout_s=30),
        LimitPolicy(rpm=5, max_tokens=256),
        d,
    )
    assert (eff.tenant_rpm, eff.tenant_tpm, eff.key_rpm, eff.key_tpm) == (600, 50_000, 5, None)
    assert (eff.max_tokens, eff.timeout_s, eff.tenant_budget, eff.key_budget) == (256, 30.0, budget, None)
    assert combine(None, None, Defaults()).unlimited


def test_budget_windows() -> None:
    now = datetime(2026, 11, 23, 21, 0, tzinfo=UTC)
    assert Budget("tokens", Decimal(5), "month").window(now) == ("m202611", datetime(2026, 11, 1, tzinfo=UTC))
    since = datetime(2026, 10, 2, 3, 4, 5, tzinfo=UTC)
    assert Budget("money", Decimal("1.5"), "prepaid", since).window(now)[1] == since
    assert Budget("money", Decimal("12.3456789"), "month").limit_units() == 12_345_678  # millionths, floor


def test_prompt_counter_without_tokenizer_counts_bytes_as_an_upper_bound(tmp_path: Path) -> None:
    c = PromptCounter(tmp_path)
    body = {
        "messages": [
            {"role": "user", "content": "héllo"},
            {"role": "user", "content": [{"type": "text", "text": "abc"}]},
        ]
    }
    count = c.count_chat("m", body)
    assert not count.exact and count.tokens == 6 + 3 + 2 * 8 + 16
    assert c.count_completion("m", {"prompt": ["ab", "cde"]}).tokens == 5 + 2 * 2
    assert c.count_completion("m", {"prompt": [1, 2, 3]}).prompts == 1


def test_prompt_counter_with_the_models_tokenizer_is_exact_and_above_the_real_count() -> None:
    models = REPO / "data" / "models"
    if not (models / "smollm2-135m-instruct" / "tokenizer.json").is_file():
        pytest.skip("the default model is not prepared (make test prepares it)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(models / "smollm2-135m-instruct" / "tokenizer.json"))
    text = "The quick brown fox jumps over the lazy dog. " * 20
    count = PromptCounter(models).count_chat(
        "smollm2-135m-instruct", {"messages": [{"role": "user", "content": text}]}
    )
    assert count.exact
    real = len(tok.encode(text).ids)
    assert real < count.tokens <= real + 8 + 16 < len(text.encode())


def test_static_and_price_book_pricers() -> None:
    p = StaticPricer("USD", {("m", TokenType.INPUT): Decimal(2), ("m", TokenType.OUTPUT): Decimal(6)})
    assert (
        cost_units(p, "m", "USD", "t", input_tokens=1_000_000, cached_tokens=0, output_tokens=500_000)
        == 5_000_000
    )
    with pytest.raises(PriceUnavailable):
        p.price("m", TokenType.INPUT, 1, "EUR")
    assert to_micro(Decimal("0.0000001")) == 1  # rounded up: a charge is never under-counted
    book = PriceBookPricer(load_price_source(REPO / "configs" / "billing" / "price_books.yaml"))
    assert book is not None
    on = datetime(2026, 3, 1).date()
    # qwen output is volume-tiered 0.90 / 0.80 / 0.70 per 1M: budgets count the highest.
    assert book.price("qwen2.5-7b-instruct", TokenType.OUTPUT, 1_000_000, "USD", on=on) == Decimal("0.90")
    assert book.price("smollm2-135m-instruct", TokenType.INPUT, 500_000, "USD", on=on) == Decimal("0.010")
    with pytest.raises(PriceUnavailable):
        book.price("no-such-model", TokenType.INPUT, 1, "USD", on=on)


async def test_settling_twice_counts_once(backend: Any) -> None:
    """A settle retried after a timeout (Redis ran the first one) must not add the usage again."""
    k = ns()
    ok = await backend.admit("r1", T0, [], [hold(k, 100, 40, ttl_ms=1000)], "e")
    for _ in range(2):
        await backend.settle("r1", T0, [HoldSettle(k + ":bg", 30, ok.epochs[0])], [])
    assert (await backend.status(k + ":bg", T0)).used == 30
    # The same for a hold that expired before its request ended: counted once, late.
    await backend.admit("r2", T0, [], [hold(k, 100, 40, ttl_ms=1000)], "e")
    await backend.admit("r3", T0 + 2000, [], [hold(k, 100, 1, ttl_ms=1000)], "e")  # purges r2's hold
    for _ in range(2):
        await backend.settle("r2", T0 + 2500, [HoldSettle(k + ":bg", 20, ok.epochs[0])], [])
    st = await backend.status(k + ":bg", T0 + 2500)
    assert (st.used, st.reserved) == (50, 1)


class _BudgetOf1000:
    """Policies: every tenant has a 1,000-token monthly budget, no key has its own."""

    def tenant(self, _t: str) -> LimitPolicy:
        return LimitPolicy(budget=Budget("tokens", Decimal(1000), "month"))

    def key(self, _k: str) -> None:
        return None


class _NoUsage:
    """A ledger without usage: budgets seed at zero."""

    def summary(self, *_a: Any, **_kw: Any) -> list[dict[str, Any]]:
        return []


async def test_an_admission_that_timed_out_after_redis_ran_it_drops_its_hold() -> None:
    """Redis ran the script but the answer came too late: the budget must not stay held (phantom 429s)."""
    from datetime import UTC, datetime

    from metering.metrics import Metrics
    from metering.tenants import Tenant
    from serving.limits.errors import LimitsUnavailable
    from serving.limits.limiter import Limiter

    class Late(MemoryBackend):
        async def admit(self, *a: Any, **kw: Any) -> Any:
            result = await super().admit(*a, **kw)
            if result.status == "ok":
                raise TimeoutError("answer lost")
            return result

    backend = Late()
    limiter = Limiter(backend, _BudgetOf1000(), _NoUsage(), Metrics([]), defaults=Defaults())  # type: ignore[arg-type]
    tenant = Tenant("t", "T", "DE", True, None, "USD", None, None, datetime.now(UTC))
    with pytest.raises(LimitsUnavailable):
        await limiter.admit(tenant, "key_1", "r1", "m", prompt_tokens=100, completion_tokens=800)
    key = next(iter(backend._holds))
    assert (await backend.status(key, limiter._now_ms())).reserved == 900
    await asyncio.sleep(1.2)
    await limiter.drain()
    assert (await backend.status(key, limiter._now_ms())).reserved == 0


async def test_a_request_whose_event_the_ledger_refused_drops_its_hold() -> None:
    """Fail-closed ledger down: the request was not billed, so its budget hold goes at once (not at
    its expiry, which would block the budget for the request timeout after every refused commit)."""
    from datetime import UTC, datetime

    from metering.events import Outcome
    from metering.metrics import Metrics
    from metering.recorder import RequestMeter
    from metering.tenants import Tenant
    from serving.limits.limiter import Limiter

    backend = MemoryBackend()
    limiter = Limiter(backend, _BudgetOf1000(), _NoUsage(), Metrics([]), defaults=Defaults())  # type: ignore[arg-type]
    tenant = Tenant("t", "T", "DE", True, None, "USD", None, None, datetime.now(UTC))
    await limiter.admit(tenant, "key_1", "r1", "m", prompt_tokens=100, completion_tokens=800)
    key = next(iter(backend._holds))
    assert (await backend.status(key, limiter._now_ms())).reserved == 900
    meter = RequestMeter(
        request_id="r1",
        tenant_id="t",
        key_id="key_1",
        model="m",
        endpoint="chat.completions",
        origin_country="DE",
        origin_source="tenant",
        stream=False,
    )
    limiter.on_lost(meter.event(Outcome.OK))
    await limiter.drain()
    st = await backend.status(key, limiter._now_ms())
    assert (st.reserved, st.used) == (0, 0)
