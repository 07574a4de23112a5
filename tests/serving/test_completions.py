"""Chat and text completions through the gateway: what the client sees, what the worker was asked,
what the ledger and /metrics record."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from metering.events import Outcome
from tests.conftest import MODEL, Gateway, TenantKey, metric
from tests.fakes import FakeWorker
from tests.serving.helpers import chat_body, stream_raw

PROMPT, CACHED, TOKENS = 40, 16, 5
TEXT = "".join(f" w{i}" for i in range(TOKENS))
FORCED = {"include_usage": True, "continuous_usage_stats": True}


async def _call(
    client: openai.AsyncOpenAI, endpoint: str, stream: bool, stream_options: dict[str, Any] | None
) -> tuple[str, str, list[Any]]:
    """Returns (request id, text, chunks or [completion])."""
    kw: dict[str, Any] = {"model": MODEL}
    if stream:
        kw["stream"] = True
        if stream_options is not None:
            kw["stream_options"] = stream_options
    if endpoint == "chat.completions":
        raw = await client.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": "Say hello"}], **kw
        )
    else:
        raw = await client.completions.with_raw_response.create(prompt="Say hello", max_tokens=TOKENS, **kw)
    ids = raw.headers.get_list("x-request-id")
    assert len(ids) == 1
    parsed = raw.parse()
    if not stream:
        choice = parsed.choices[0]
        text = choice.message.content if endpoint == "chat.completions" else choice.text
        return ids[0], text, [parsed]
    chunks = [c async for c in parsed]
    text = ""
    for c in chunks:
        for ch in c.choices:
            text += (ch.delta.content or "") if endpoint == "chat.completions" else ch.text
    return ids[0], text, chunks


CASES = [
    pytest.param("chat.completions", False, None, id="chat"),
    pytest.param("chat.completions", True, None, id="chat-stream"),
    pytest.param("chat.completions", True, {"include_usage": False}, id="chat-stream-usage-false"),
    pytest.param("chat.completions", True, {"include_usage": True}, id="chat-stream-include-usage"),
    pytest.param("completions", False, None, id="completions"),
    pytest.param("completions", True, None, id="completions-stream"),
    pytest.param("completions", True, {"include_usage": True}, id="completions-stream-include-usage"),
]


@pytest.mark.parametrize(("endpoint", "stream", "stream_options"), CASES)
async def test_completion_is_relayed_and_metered_exactly(
    gateway: Gateway,
    tenant: TenantKey,
    client: openai.AsyncOpenAI,
    worker: FakeWorker,
    endpoint: str,
    stream: bool,
    stream_options: dict[str, Any] | None,
) -> None:
    worker.behave(tokens=TOKENS, prompt_tokens=PROMPT, cached_tokens=CACHED)
    before = await gateway.metrics()

    request_id, text, chunks = await _call(client, endpoint, stream, stream_options)

    # What the client sees.
    assert text == TEXT
    want_usage = bool(stream_options and stream_options.get("include_usage"))
    if not stream:
        usage = chunks[0].usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            PROMPT,
            TOKENS,
            PROMPT + TOKENS,
        )
        assert usage.prompt_tokens_details.cached_tokens == CACHED
    else:
        content = [c for c in chunks if c.choices]
        assert all(c.usage is None for c in content), "usage leaked into content chunks"
        usage_chunks = [c for c in chunks if not c.choices]
        if want_usage:
            assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
            u = usage_chunks[0].usage
            assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (PROMPT, TOKENS, PROMPT + TOKENS)
            assert u.prompt_tokens_details.cached_tokens == CACHED
        else:
            assert usage_chunks == []

    # What the worker was asked.
    [received] = worker.completion_requests()
    assert received.path == ("/v1/chat/completions" if endpoint == "chat.completions" else "/v1/completions")
    assert received.headers.get("x-request-id") == request_id
    if stream:
        assert received.body["stream_options"] == {**(stream_options or {}), **FORCED}
    else:
        assert "stream_options" not in received.body

    # What the ledger holds: one row, the worker's exact counts.
    stored = await gateway.wait_event(request_id)
    assert [e.event.request_id for e in gateway.events_for(tenant.tenant.id)] == [request_id]
    ev = stored.event
    assert (ev.prompt_tokens, ev.cached_prompt_tokens, ev.completion_tokens) == (PROMPT, CACHED, TOKENS)
    assert ev.outcome is Outcome.OK
    assert ev.stream is stream
    assert ev.estimated is False
    assert (ev.tenant_id, ev.key_id, ev.model, ev.endpoint) == (
        tenant.tenant.id,
        tenant.key.id,
        MODEL,
        endpoint,
    )
    assert (ev.origin_country, ev.origin_source) == ("DE", "tenant")
    assert (ev.worker_id, ev.serving_region) == ("fake-0", "region-fake-0")
    assert ev.started_at <= ev.finished_at <= stored.recorded_at

    # What Prometheus saw: exactly those tokens, split by type.
    after = await gateway.metrics()
    t = tenant.tenant.id

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert (
        delta("tokenport_tokens_total", tenant=t, model=MODEL, origin_country="DE", token_type="input")
        == PROMPT - CACHED
    )
    assert delta("tokenport_tokens_total", tenant=t, token_type="cached_input") == CACHED
    assert delta("tokenport_tokens_total", tenant=t, token_type="output") == TOKENS
    assert delta("tokenport_requests_total", tenant=t, model=MODEL, outcome="ok") == 1
    assert delta("tokenport_requests_total", tenant=t) == 1


@pytest.mark.parametrize(
    ("stream_options", "usage_on"),
    [
        pytest.param(None, "none", id="no-options"),
        pytest.param({"include_usage": True}, "final", id="include_usage"),
        pytest.param({"include_usage": True, "continuous_usage_stats": True}, "every", id="continuous"),
    ],
)
async def test_raw_sse_carries_usage_only_as_asked(
    gateway: Gateway,
    tenant: TenantKey,
    worker: FakeWorker,
    stream_options: dict[str, Any] | None,
    usage_on: str,
) -> None:
    worker.behave(tokens=4, prompt_tokens=12, cached_tokens=2)
    body = chat_body(stream=True)
    if stream_options is not None:
        body["stream_options"] = stream_options
    out = await stream_raw(gateway.http, tenant.api_key, body)
    assert out.status == 200 and out.headers["content-type"].startswith("text/event-stream")
    assert out.done and out.raw_events[-1] == b"[DONE]"
    content = [e for e in out.events if e["choices"]]
    final = [e for e in out.events if not e["choices"]]
    assert len(content) == 5  # the role chunk and one chunk per token
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    if usage_on == "none":
        assert final == []
        assert all("usage" not in e for e in out.events)
    elif usage_on == "final":
        assert all("usage" not in e for e in content)
        assert len(final) == 1 and out.events[-1] is final[0]
        assert final[0]["usage"] == {
            "prompt_tokens": 12,
            "total_tokens": 16,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 2},
        }
    else:
        assert [e["usage"]["completion_tokens"] for e in content] == [0, 1, 2, 3, 4]
        assert final[0]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    ev = (await gateway.wait_event(out.request_id)).event
    assert (ev.prompt_tokens, ev.cached_prompt_tokens, ev.completion_tokens) == (12, 2, 4)


async def test_language_of_the_prompt_is_on_the_event_and_metric(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Привет! Расскажи, пожалуйста, какая сегодня погода в Москве?"},
        ],
    )
    ev = (await gateway.wait_event(raw.headers["x-request-id"])).event
    assert ev.language == "ru"
    text = await gateway.metrics()
    assert (
        metric(text, "tokenport_tokens_total", tenant=tenant.tenant.id, language="ru", token_type="output")
        == 3
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("stream", "false"), ("stream", 0), ("n", "2"), ("max_tokens", "16"), ("temperature", "0.5")],
)
async def test_values_are_not_coerced(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker, field: str, value: object
) -> None:
    """The body is forwarded as sent, so the gateway must judge it as the worker will: a lax "false" would be
    metered and relayed as a stream by the gateway but answered as JSON by vLLM (found in review; now
    refused by strict validation)."""
    r = await gateway.http.post(
        "/v1/chat/completions",
        json=chat_body(**{field: value}),
        headers={"Authorization": f"Bearer {tenant.api_key}"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert worker.completion_requests() == []
    assert gateway.events_for(tenant.tenant.id) == []
