"""Rate limits, budgets and per-tenant caps through a running gateway (uvicorn + fake vLLM worker).

The budget tests are the point of the issue: 64+ concurrent streams against a small budget, on one
gateway (in-process backend) and on two gateways sharing Redis and the database, with some clients
going away mid-stream; the tenant's ledger total never ends above its budget and the budget's own
count equals the ledger exactly once everything has settled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from billing.prices import load_price_source
from metering.events import TokenType
from serving.limits.pricing import PriceBookPricer
from tests import redis_fixture
from tests.conftest import MODEL, OTHER_MODEL, Gateway, metric
from tests.fakes import FakeWorker
from tests.redis_fixture import RedisServer
from tests.serving.limits_support import (
    ADMIN,
    PRICE_BOOK,
    bearer,
    budget,
    chat,
    guarded_gateway,
    ledger_tokens,
    set_key_limits,
    set_limits,
    settled_budget,
    stream_all,
)

redis_server = redis_fixture.redis_server  # the fixture, for this module
DEAD = "dead-model"


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    workers = [(MODEL, "f0", fake.url), (OTHER_MODEL, "f1", fake.url), (DEAD, "dead", "http://127.0.0.1:9")]
    async with guarded_gateway(tmp_path_factory.mktemp("limits-gw"), workers, health_interval_s=0.2) as g:
        yield g


async def test_rate_limit_headers_on_every_response_and_openai_429(gw: Gateway, worker: FakeWorker) -> None:
    t, _key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, rpm=3, tpm=100_000)
    remaining = []
    for stream in (False, True, False):
        if stream:
            status, headers, _ = await stream_all(gw.http, api_key, chat(max_tokens=8))
        else:
            r = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=8), headers=bearer(api_key))
            status, headers = r.status_code, r.headers
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    r = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=8), headers=bearer(api_key))
    assert r.status_code == 429
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert "Limit 3" in r.json()["error"]["message"]
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(r.headers["retry-after"]) <= 20 and int(r.headers["retry-after-ms"]) > 0
    with pytest.raises(openai.RateLimitError) as info:
        await gw.client(api_key).chat.completions.create(**chat(max_tokens=8))
    assert info.value.code == "rate_limit_exceeded"
    assert len(worker.completion_requests()) == 3  # refused requests never reach a worker
    assert metric(await gw.metrics(), "tokenport_limit_rejections_total", reason="requests") >= 2


async def test_tokens_per_minute_hold_the_worst_case_and_give_back_the_rest(
    gw: Gateway, worker: FakeWorker
) -> None:
    t, _key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, tpm=300)
    worker.behave(tokens=3, prompt_tokens=20)
    r1 = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=100), headers=bearer(api_key))
    worst = int(r1.headers["x-ratelimit-limit-tokens"]) - int(r1.headers["x-ratelimit-remaining-tokens"])
    assert worst == 9 + 8 + 16 + 100  # prompt upper bound (bytes + template allowance) + max_tokens
    await settled_budget_or_idle(gw)
    r2 = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=100), headers=bearer(api_key))
    # r1 used 23 tokens: 110 of its 133 came back, so r2 sees about 300 - 23 - 133 (plus a little refill).
    assert 300 - 23 - 133 <= int(r2.headers["x-ratelimit-remaining-tokens"]) <= 300 - 23 - 133 + 10
    big = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=1000), headers=bearer(api_key))
    assert big.status_code == 429 and "Request too large" in big.json()["error"]["message"]
    assert "retry-after" not in big.headers  # waiting does not help


async def settled_budget_or_idle(gw: Gateway) -> None:
    await asyncio.sleep(0.1)  # settles run right after the ledger commit


async def test_a_keys_own_limits_apply_to_that_key_only(gw: Gateway, worker: FakeWorker) -> None:
    t, key1, api1 = gw.new_tenant()
    _key2, api2 = gw.tenants.create_key(t.id, name="second")
    await set_key_limits(gw, key1.id, rpm=1)
    assert (
        await gw.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(api1))
    ).status_code == 200
    refused = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(api1))
    assert refused.status_code == 429 and "API key" in refused.json()["error"]["message"]
    for _ in range(3):
        ok = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(api2))
        # the second key is held only to the tenant's (default) limit, not to the first key's 1 rpm
        assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "1000000"


async def test_max_tokens_cap_is_enforced_and_injected(gw: Gateway, worker: FakeWorker) -> None:
    t, _key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, max_tokens=64, max_prompt_tokens=200)
    r = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=65), headers=bearer(api_key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_exceeded"
    assert r.json()["error"]["param"] == "max_tokens"
    r = await gw.http.post(
        "/v1/chat/completions", json=chat(max_completion_tokens=500), headers=bearer(api_key)
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    r = await gw.http.post("/v1/chat/completions", json=chat(), headers=bearer(api_key))
    assert r.status_code == 200
    assert worker.completion_requests()[-1].body["max_tokens"] == 64  # the worker can never exceed the hold
    r = await gw.http.post(
        "/v1/chat/completions", json=chat("x" * 300, max_tokens=8), headers=bearer(api_key)
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = await gw.http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["y" * 100, "z" * 100], "max_tokens": 8},
        headers=bearer(api_key),
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


async def test_allowed_models_per_tenant(gw: Gateway, worker: FakeWorker) -> None:
    t, _key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, allowed_models=[OTHER_MODEL])
    await asyncio.sleep(0.4)  # the key cache reloads the tenant within key_cache_refresh_s
    r = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(api_key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    ok = await gw.http.post(
        "/v1/chat/completions", json={**chat(max_tokens=4), "model": OTHER_MODEL}, headers=bearer(api_key)
    )
    assert ok.status_code == 200
    models = (await gw.http.get("/v1/models", headers=bearer(api_key))).json()["data"]
    assert [m["id"] for m in models] == [OTHER_MODEL]


async def test_per_tenant_request_timeout_cuts_the_stream_and_meters_what_was_made(
    gw: Gateway, worker: FakeWorker
) -> None:
    t, _key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, request_timeout_s=1, budget={"unit": "tokens", "amount": 100_000})
    worker.behave(tokens=20, delay_s=0.2)
    t0 = time.monotonic()
    status, headers, data = await stream_all(gw.http, api_key, chat(max_tokens=20))
    assert status == 200 and time.monotonic() - t0 < 3
    assert b'"upstream_error"' in data and b"[DONE]" not in data
    ev = await gw.wait_event(headers["x-request-id"])
    assert ev.event.outcome.value == "upstream_error" and 0 < ev.event.completion_tokens < 20
    b = await settled_budget(gw, t.id)
    assert int(b["used"]) == ledger_tokens(gw, t.id)


async def test_a_hold_is_released_when_no_worker_is_reached(gw: Gateway, worker: FakeWorker) -> None:
    t, _key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, budget={"unit": "tokens", "amount": 1000})
    r = await gw.http.post(
        "/v1/chat/completions", json={**chat(max_tokens=900), "model": DEAD}, headers=bearer(api_key)
    )
    assert r.status_code in (502, 503)
    b = await settled_budget(gw, t.id)
    assert b["used"] == "0" and b["remaining"] == "1000"
    ok = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=900), headers=bearer(api_key))
    assert ok.status_code == 200  # the 900 held by the failed request came back at once


async def _storm(gws: list[Gateway], api_key: str, n: int, *, max_tokens: int) -> list[int]:
    """n concurrent streams spread over the gateways; every 5th client goes away after two chunks."""

    async def one(i: int) -> int:
        g = gws[i % len(gws)]
        status, _h, _d = await stream_all(
            g.http, api_key, chat(max_tokens=max_tokens), cut_after=2 if i % 5 == 0 else None
        )
        return status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_64_concurrent_streams_never_take_a_tenant_above_its_token_budget(
    gw: Gateway, worker: FakeWorker
) -> None:
    t, _key, api_key = gw.new_tenant()
    limit = 1000
    await set_limits(gw, t.id, budget={"unit": "tokens", "amount": limit})
    worker.behave(tokens=20, prompt_tokens=30, delay_s=0.02)
    first = await _storm([gw], api_key, 64, max_tokens=20)
    second = await _storm([gw], api_key, 64, max_tokens=20)
    assert first.count(200) >= 10 and set(first + second) <= {200, 429}
    b = await settled_budget(gw, t.id)
    used = ledger_tokens(gw, t.id)
    assert used <= limit
    assert int(b["used"]) == used  # the budget's count is exactly the ledger: nothing lost or counted twice
    assert int(b["remaining"]) < 33 + 20  # and the budget was used up to its edge
    assert 0 < metric(await gw.metrics(), "tokenport_budget_used_ratio", tenant=t.id) <= 1


async def test_money_budget_priced_from_the_price_book(gw: Gateway, worker: FakeWorker) -> None:
    t, _key, api_key = gw.new_tenant()  # USD
    await set_limits(gw, t.id, budget={"unit": "money", "amount": "0.00005"})
    worker.behave(tokens=200, prompt_tokens=30)
    results = await asyncio.gather(
        *(
            gw.http.post("/v1/chat/completions", json=chat(max_tokens=200), headers=bearer(api_key))
            for _ in range(20)
        )
    )
    codes = [r.status_code for r in results]
    assert 1 <= codes.count(200) <= 6 and set(codes) <= {200, 429}
    quota = next(r for r in results if r.status_code == 429).json()["error"]
    assert (
        quota["code"] == "insufficient_quota"
        and quota["type"] == "insufficient_quota"
        and "USD" in quota["message"]
    )
    b = await settled_budget(gw, t.id)
    pricer = PriceBookPricer(load_price_source(Path(PRICE_BOOK)))
    assert pricer is not None
    spent = sum(
        pricer.price(MODEL, TokenType.INPUT, e.event.input_tokens, "USD")
        + pricer.price(MODEL, TokenType.OUTPUT, e.event.completion_tokens, "USD")
        for e in gw.events_for(t.id)
    )
    assert spent <= Decimal("0.00005") and Decimal(b["used"]) >= spent
    r = await gw.http.post(
        "/v1/chat/completions", json={**chat(max_tokens=4), "model": OTHER_MODEL}, headers=bearer(api_key)
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_priced"  # never a silent zero


async def test_prepaid_balance_and_top_up(gw: Gateway, worker: FakeWorker) -> None:
    t, _key, api_key = gw.new_tenant()
    worker.behave(tokens=10, prompt_tokens=30)
    await set_limits(gw, t.id, budget={"unit": "tokens", "amount": 100, "period": "prepaid"})
    assert (
        await gw.http.post("/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(api_key))
    ).status_code == 200
    await settled_budget(gw, t.id)
    assert (
        await gw.http.post("/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(api_key))
    ).status_code == 200
    await settled_budget(gw, t.id)
    r = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(api_key))
    assert r.status_code == 429 and "prepaid balance" in r.json()["error"]["message"]
    top = await gw.http.post(f"/admin/v1/tenants/{t.id}/budget/top-up", json={"amount": 100}, headers=ADMIN)
    assert top.status_code == 200 and top.json()["budget"]["amount"] == "200"
    assert (
        await gw.http.post("/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(api_key))
    ).status_code == 200
    b = await settled_budget(gw, t.id)
    assert int(b["used"]) == ledger_tokens(gw, t.id) == 3 * 40


# --- Redis: several gateway processes ---------------------------------------------------------
@pytest.fixture
async def redis_pair(
    fake: FakeWorker, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[list[Gateway]]:
    env = {
        "TOKENPORT_LIMITS__BACKEND": "redis",
        "TOKENPORT_LIMITS__REDIS_URL": redis_server.url,
        "TOKENPORT_LIMITS__REDIS_TIMEOUT_S": "3",  # a shared 2-core test machine can be slow
        "TOKENPORT_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}",
    }
    workers = [(MODEL, "f0", fake.url)]
    async with (
        guarded_gateway(tmp_path / "a", workers, env=env) as a,
        guarded_gateway(tmp_path / "b", workers, env=env) as b,
    ):
        yield [a, b]


async def test_two_gateways_on_redis_hold_one_budget_under_64_streams(
    redis_pair: list[Gateway], worker: FakeWorker
) -> None:
    a, b = redis_pair
    t, _key, api_key = a.new_tenant()
    limit = 1200
    await set_limits(a, t.id, budget={"unit": "tokens", "amount": limit}, rpm=1000)
    await asyncio.sleep(0.4)  # gateway b's policy cache reloads within key_cache_refresh_s
    worker.behave(tokens=20, prompt_tokens=30, delay_s=0.02)
    codes = await _storm([a, b], api_key, 96, max_tokens=20)
    assert codes.count(200) >= 10 and set(codes) <= {200, 429}
    settled = await settled_budget(a, t.id)
    used = ledger_tokens(a, t.id)
    assert used <= limit and int(settled["used"]) == used
    assert (await budget(b, t.id))["used"] == settled["used"]  # both gateways see one budget


async def test_two_gateways_on_redis_share_one_request_limit(
    redis_pair: list[Gateway], worker: FakeWorker
) -> None:
    a, b = redis_pair
    t, _key, api_key = a.new_tenant()
    await set_limits(a, t.id, rpm=4)
    await asyncio.sleep(0.4)
    codes = []
    for i in range(6):
        r = await (a, b)[i % 2].http.post(
            "/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(api_key)
        )
        codes.append(r.status_code)
    assert codes == [200, 200, 200, 200, 429, 429]


async def test_redis_down_fails_closed_for_budgets_and_bounded_open_for_rate_limits(
    fake: FakeWorker, worker: FakeWorker, tmp_path: Path
) -> None:
    env = {
        "TOKENPORT_LIMITS__BACKEND": "redis",
        "TOKENPORT_LIMITS__REDIS_URL": "redis://127.0.0.1:9/0",
        "TOKENPORT_LIMITS__REDIS_TIMEOUT_S": "0.2",
    }
    async with guarded_gateway(tmp_path / "down", [(MODEL, "f0", fake.url)], env=env) as g:
        tb, _k, key_b = g.new_tenant()
        tr, _k2, key_r = g.new_tenant()
        await set_limits(g, tb.id, budget={"unit": "tokens", "amount": 10_000})
        await set_limits(g, tr.id, rpm=5)
        r = await g.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(key_b))
        assert r.status_code == 503 and r.json()["error"]["code"] == "limits_unavailable"
        codes = []
        for _ in range(7):  # open, but bounded: this process counts the 5 a minute itself
            r = await g.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(key_r))
            codes.append(r.status_code)
        assert codes == [200] * 5 + [429] * 2, codes
        assert metric(await g.metrics(), "tokenport_limits_backend_errors_total", op="admit") >= 8
    env["TOKENPORT_LIMITS__ON_BACKEND_ERROR_RATE"] = "closed"
    async with guarded_gateway(tmp_path / "down2", [(MODEL, "f0", fake.url)], env=env) as g:
        tr, _k, key_r = g.new_tenant()
        await set_limits(g, tr.id, rpm=5)
        r = await g.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(key_r))
        assert r.status_code == 503


async def test_a_redis_restart_reseeds_budgets_from_the_ledger(
    fake: FakeWorker, worker: FakeWorker, tmp_path: Path
) -> None:
    from tests.redis_fixture import _free_port

    server = RedisServer(_free_port(), tmp_path).start()
    try:
        env = {"TOKENPORT_LIMITS__BACKEND": "redis", "TOKENPORT_LIMITS__REDIS_URL": server.url}
        async with guarded_gateway(tmp_path / "g", [(MODEL, "f0", fake.url)], env=env) as g:
            t, _k, api_key = g.new_tenant()
            await set_limits(g, t.id, budget={"unit": "tokens", "amount": 500})
            worker.behave(tokens=10, prompt_tokens=30)
            for _ in range(3):
                assert (
                    await g.http.post(
                        "/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(api_key)
                    )
                ).status_code == 200
            await settled_budget(g, t.id)
            server.stop()
            r = await g.http.post("/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(api_key))
            assert r.status_code == 503  # fail closed while Redis is away
            server.start()  # empty: every counter is gone
            assert (
                await g.http.post("/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(api_key))
            ).status_code == 200
            b = await settled_budget(g, t.id)
            assert int(b["used"]) == ledger_tokens(g, t.id) == 4 * 40
    finally:
        server.stop()


async def test_a_tenant_without_limits_gets_the_default_ceiling_headers(
    gw: Gateway, worker: FakeWorker
) -> None:
    _t, _k, api_key = gw.new_tenant()
    r = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(api_key))
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "1000000"
    assert r.headers["x-ratelimit-limit-tokens"] == "1000000000"
    assert int(r.headers["x-ratelimit-remaining-requests"]) == 999_999
    assert {"x-ratelimit-reset-requests", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"} <= set(
        r.headers
    )
    _ = httpx  # (typing helper import kept for readers of these tests)


async def test_split_token_fields_are_held_capped_and_sent_as_one(gw: Gateway, worker: FakeWorker) -> None:
    """vLLM generates max_completion_tokens when both fields come: the worker gets one field, the
    limit that was held (the smaller), so 1 held token cannot become 1,500 generated ones."""
    t, _key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, tpm=100_000, max_tokens=50)
    r = await gw.http.post(
        "/v1/chat/completions", json=chat(max_tokens=1, max_completion_tokens=1500), headers=bearer(api_key)
    )
    assert r.status_code == 200, r.text
    held = int(r.headers["x-ratelimit-limit-tokens"]) - int(r.headers["x-ratelimit-remaining-tokens"])
    assert held == 9 + 8 + 16 + 1  # prompt upper bound + the one limit
    sent = worker.completion_requests()[-1].body
    assert sent["max_tokens"] == 1 and "max_completion_tokens" not in sent
    r = await gw.http.post(
        "/v1/chat/completions", json=chat(max_tokens=1500, max_completion_tokens=2), headers=bearer(api_key)
    )
    assert r.status_code == 200, r.text
    sent = worker.completion_requests()[-1].body
    assert sent["max_tokens"] == 2 and "max_completion_tokens" not in sent
    r = await gw.http.post(
        "/v1/chat/completions", json=chat(max_completion_tokens=60), headers=bearer(api_key)
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    _t2, _key2, api2 = gw.new_tenant()  # no caps of its own: still one field upstream
    r = await gw.http.post("/v1/chat/completions", json=chat(max_completion_tokens=7), headers=bearer(api2))
    assert r.status_code == 200, r.text
    sent = worker.completion_requests()[-1].body
    assert sent["max_tokens"] == 7 and "max_completion_tokens" not in sent


async def test_timeout_before_the_first_byte_bills_the_prompt_and_settles_the_hold(
    gw: Gateway, worker: FakeWorker
) -> None:
    """The worker prefilled the prompt before the tenant's timeout cut the request: the prompt is billed
    (estimated) and the hold is settled by that event, so the request cannot be repeated for free."""
    t, _key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, request_timeout_s=1, budget={"unit": "tokens", "amount": 100_000})
    worker.behave(tokens=5, delay_s=3)  # the first event would come after the timeout
    status, headers, _data = await stream_all(gw.http, api_key, chat("tell me a long story", max_tokens=20))
    assert status == 502
    ev = (await gw.wait_event(headers["x-request-id"])).event
    assert ev.outcome.value == "upstream_error" and ev.estimated
    assert ev.prompt_tokens > 4 and ev.completion_tokens == 0
    b = await settled_budget(gw, t.id)
    assert int(b["used"]) == ev.prompt_tokens
