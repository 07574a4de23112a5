"""POST /v1/embeddings through the one pipeline (fake worker): schema, capability, metering under
its own token type, vLLM's `dimensions` refusal in our words, budgets and the models' metadata."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from metering.events import TokenType
from tests.conftest import MODEL, Gateway, metric
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error, auth
from tests.serving.limits_support import budget, guarded_gateway, set_limits

EMBED = "smollm2-135m-embed"
SPECS = {
    EMBED: {"kind": "embedding", "max_model_len": 512, "languages": ["en", "kk"]},
    MODEL: {"max_model_len": 2048, "tool_call_parser": "hermes"},
}


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with guarded_gateway(
        tmp_path_factory.mktemp("surface"),
        [(MODEL, "f0", fake.url), (EMBED, "e0", fake.url)],
        model_specs=SPECS,
    ) as g:
        yield g


async def test_the_official_client_gets_embeddings_float_and_base64(gw: Gateway, worker: FakeWorker) -> None:
    _t, _k, api_key = gw.new_tenant()
    worker.behave(prompt_tokens=7)
    client = gw.client(api_key)
    got = await client.embeddings.create(model=EMBED, input=["hello", "world"])
    assert [d.index for d in got.data] == [0, 1] and got.data[0].embedding == [0.5, -0.25, 0.125, 1.0]
    assert got.usage.prompt_tokens == 7
    raw = await gw.http.post(
        "/v1/embeddings",
        json={"model": EMBED, "input": "hi", "encoding_format": "base64"},
        headers=auth(api_key),
    )
    assert raw.status_code == 200 and base64.b64decode(raw.json()["data"][0]["embedding"])
    rid = raw.headers["x-request-id"]
    ev = (await gw.wait_event(rid)).event
    assert (ev.endpoint, ev.prompt_tokens, ev.completion_tokens, ev.outcome.value) == (
        "embeddings",
        7,
        0,
        "ok",
    )
    assert ev.tokens_by_type() == {TokenType.EMBEDDING_INPUT: 7}
    sent = worker.completion_requests()[-1]
    assert sent.path == "/v1/embeddings" and sent.body == {
        "model": EMBED,
        "input": "hi",
        "encoding_format": "base64",
    }
    text = await gw.metrics()
    assert metric(text, "tokenport_tokens_total", token_type="embedding_input") >= 14
    assert metric(text, "tokenport_tokens_total", model=EMBED, token_type="input") == 0


async def test_embeddings_validation_and_capabilities(gw: Gateway, worker: FakeWorker) -> None:
    _t, _k, api_key = gw.new_tenant()
    h = auth(api_key)
    bad = await gw.http.post(
        "/v1/embeddings", json={"model": EMBED, "input": "x", "encoding_format": "hex"}, headers=h
    )
    assert_openai_error(bad, 400, param="encoding_format")
    extra = await gw.http.post(
        "/v1/embeddings", json={"model": EMBED, "input": "x", "stream": True}, headers=h
    )
    assert_openai_error(extra, 400, param="stream")
    empty = await gw.http.post("/v1/embeddings", json={"model": EMBED, "input": []}, headers=h)
    assert_openai_error(empty, 400, param="input")
    chat_model = await gw.http.post("/v1/embeddings", json={"model": MODEL, "input": "x"}, headers=h)
    assert_openai_error(chat_model, 400, code="model_not_supported", param="model")
    chat_on_embed = await gw.http.post(
        "/v1/chat/completions",
        headers=h,
        json={"model": EMBED, "messages": [{"role": "user", "content": "x"}]},
    )
    assert_openai_error(chat_on_embed, 400, code="model_not_supported")
    unknown = await gw.http.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=h)
    assert_openai_error(unknown, 404, code="model_not_found")
    assert worker.completion_requests() == []  # none of these reached a worker


async def test_dimensions_refused_by_the_model_is_a_400_in_our_words(gw: Gateway, worker: FakeWorker) -> None:
    _t, _k, api_key = gw.new_tenant()
    r = await gw.http.post(
        "/v1/embeddings", json={"model": EMBED, "input": "x", "dimensions": 2}, headers=auth(api_key)
    )
    err = assert_openai_error(r, 400, code="dimensions_not_supported", param="dimensions")
    assert "matryoshka" not in err["message"].lower()
    ev = (await gw.wait_event(r.headers["x-request-id"])).event
    assert ev.outcome.value == "rejected" and ev.prompt_tokens == 0


async def test_an_answer_without_usage_is_estimated_from_the_input(gw: Gateway, worker: FakeWorker) -> None:
    _t, _k, api_key = gw.new_tenant()
    worker.behave(omit_usage=True)
    r = await gw.http.post("/v1/embeddings", json={"model": EMBED, "input": "a" * 40}, headers=auth(api_key))
    assert r.status_code == 200
    ev = (await gw.wait_event(r.headers["x-request-id"])).event
    assert ev.estimated and ev.prompt_tokens >= 10 and ev.completion_tokens == 0


async def test_a_money_budget_prices_embeddings_at_their_own_price(gw: Gateway, worker: FakeWorker) -> None:
    """The embed model has only an embedding_input price: a money budget admits and settles it."""
    t, _k, api_key = gw.new_tenant()  # USD: 0.005 per 1M embedding_input tokens
    await set_limits(gw, t.id, budget={"unit": "money", "amount": "1.00"})
    worker.behave(prompt_tokens=1_000_000)
    r = await gw.http.post("/v1/embeddings", json={"model": EMBED, "input": "x"}, headers=auth(api_key))
    assert r.status_code == 200, r.text
    await gw.wait_event(r.headers["x-request-id"])
    for _ in range(50):
        used = (await budget(gw, t.id))["used"]
        if Decimal(used) > 0:
            break
        await asyncio.sleep(0.05)
    assert Decimal(used) == Decimal("0.005")


async def test_models_carry_context_languages_capabilities_and_this_tenants_prices(gw: Gateway) -> None:
    _t, _k, api_key = gw.new_tenant(currency="CNY")
    r = await gw.http.get("/v1/models", headers=auth(api_key))
    assert r.status_code == 200
    cards = {m["id"]: m for m in r.json()["data"]}
    embed, chat = cards[EMBED], cards[MODEL]
    assert {"id", "object", "created", "owned_by"} <= set(embed)
    assert embed["context_length"] == 512 and embed["languages"] == ["en", "kk"]
    assert embed["capabilities"] == ["embeddings", "batch"]
    assert chat["capabilities"] == ["chat", "completions", "responses", "batch", "tools"]  # tool_call_parser
    assert chat["languages"] is None
    assert embed["pricing"]["currency"] == "CNY" and embed["pricing"]["prices"] == {
        "embedding_input": "0.035"
    }
    assert chat["pricing"]["prices"] == {"input": "0.15", "cached_input": "0.07", "output": "0.30"}
    assert chat["pricing"]["per_tokens"] == 1_000_000
    one = await gw.http.get(f"/v1/models/{EMBED}", headers=auth(api_key))
    assert one.status_code == 200 and one.json() == embed
    missing = await gw.http.get("/v1/models/no-such-model", headers=auth(api_key))
    assert_openai_error(missing, 404, code="model_not_found")
    _t2, _k2, limited = gw.new_tenant(allowed_models=[MODEL])
    hidden = await gw.http.get(f"/v1/models/{EMBED}", headers=auth(limited))
    assert_openai_error(hidden, 404, code="model_not_found")
    listed = await gw.http.get("/v1/models", headers=auth(limited))
    assert [m["id"] for m in listed.json()["data"]] == [MODEL]
    assert_openai_error(await gw.http.get(f"/v1/models/{EMBED}"), 401)


async def test_a_tenant_in_a_currency_without_prices_sees_pricing_null(gw: Gateway) -> None:
    _t, _k, api_key = gw.new_tenant(currency="EUR")
    r = await gw.http.get(f"/v1/models/{MODEL}", headers=auth(api_key))
    assert r.status_code == 200 and r.json()["pricing"] is None
