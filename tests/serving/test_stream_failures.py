"""Streams that end badly: the client goes away, the worker dies, the worker sends no usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from metering.events import Outcome, UsageEvent
from metering.store_sql import UsageStore
from tests.conftest import MODEL, Gateway, GatewayFactory, TenantKey, metric
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error, auth, chat_body, read_sse, stream_raw

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a long story"}]
FakeFactory = Callable[[], Awaitable[FakeWorker]]


def _stream(parsed: object) -> openai.AsyncStream[ChatCompletionChunk]:
    """A raw response's parsed stream (the raw API's type is a union of a stream and a whole answer)."""
    assert isinstance(parsed, openai.AsyncStream)
    return parsed


async def _wait(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def _inflight(gateway: Gateway) -> float:
    return metric(await gateway.metrics(), "tokenport_inflight_requests", model=MODEL)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_client_disconnect_meters_tokens_so_far_and_aborts_the_worker(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker, path: str
) -> None:
    total = 60
    worker.behave(tokens=total, prompt_tokens=25, cached_tokens=5, delay_s=0.03)
    body = (
        chat_body(stream=True)
        if path.endswith("chat/completions")
        else {"model": MODEL, "prompt": "Once upon a time", "stream": True}
    )
    before = await gateway.metrics()
    async with gateway.http.stream("POST", path, json=body, headers=auth(tenant.api_key)) as resp:
        assert resp.status_code == 200
        rid = resp.headers["x-request-id"]
        seen = await read_sse(resp, stop_after=2)
        assert len(seen.events) == 2
        # closing the response here drops the connection
    closed_at = time.monotonic()

    stored = await gateway.wait_event(rid)
    ev = stored.event
    [rec] = worker.completion_requests()
    await _wait(lambda: rec.aborted, timeout=2)
    assert rec.aborted_at is not None and rec.aborted_at - closed_at < 0.5, "the worker kept generating"
    assert not rec.finished and rec.events_sent < total

    assert ev.outcome is Outcome.CLIENT_CANCELLED and ev.stream is True
    assert ev.estimated is False
    assert ev.prompt_tokens == 25
    produced = rec.events_sent - (
        1 if path.endswith("chat/completions") else 0
    )  # chat starts with a role chunk
    client_tokens = sum(
        1 for e in seen.events for c in e["choices"] if (c.get("delta") or {}).get("content") or c.get("text")
    )
    assert client_tokens >= 1
    assert client_tokens <= ev.completion_tokens < total  # at least what the client got, less than all
    assert ev.completion_tokens <= produced
    assert [e.event.request_id for e in gateway.events_for(tenant.tenant.id)] == [rid]

    after = await gateway.metrics()
    t = tenant.tenant.id
    assert (
        metric(after, "tokenport_requests_total", tenant=t, outcome="client_cancelled")
        - metric(before, "tokenport_requests_total", tenant=t, outcome="client_cancelled")
        == 1
    )
    assert metric(after, "tokenport_tokens_total", tenant=t, token_type="output") == ev.completion_tokens
    await _wait_inflight_zero(gateway)


async def _wait_inflight_zero(gateway: Gateway) -> None:
    deadline = time.monotonic() + 3
    while (n := await _inflight(gateway)) != 0:
        assert time.monotonic() < deadline, f"inflight gauge stuck at {n}"
        await asyncio.sleep(0.02)


async def test_worker_dying_mid_stream_is_an_sse_error_and_upstream_error(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    worker.behave(tokens=10, prompt_tokens=20, die_after=4, delay_s=0.01)  # role chunk + 3 tokens, then gone
    received: list[str] = []
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
    )
    rid = raw.headers["x-request-id"]
    with pytest.raises(openai.APIError) as info:
        async for chunk in _stream(raw.parse()):
            for ch in chunk.choices:
                received.append(ch.delta.content or "")
    assert not isinstance(info.value, openai.APIStatusError)
    assert info.value.body == {
        "message": "The worker failed while streaming.",
        "type": "api_error",
        "param": None,
        "code": "upstream_error",
    }
    assert "".join(received) == " w0 w1 w2"
    ev = (await gateway.wait_event(rid)).event
    assert ev.outcome is Outcome.UPSTREAM_ERROR and ev.stream is True
    assert (ev.prompt_tokens, ev.completion_tokens) == (20, 3)
    assert ev.estimated is False
    assert len(gateway.events_for(tenant.tenant.id)) == 1
    await _wait_inflight_zero(gateway)

    # The worker was taken out of the pool at once; the next health check finds it alive again and
    # the gateway serves the next request on it.
    worker.behave(die_after=None)
    deadline = time.monotonic() + 5
    while (await gateway.http.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert done.usage is not None and done.usage.completion_tokens == 10
    assert [e.event.outcome for e in gateway.events_for(tenant.tenant.id)] == [
        Outcome.UPSTREAM_ERROR,
        Outcome.OK,
    ]


async def test_worker_dying_before_the_first_event_is_retried_elsewhere(
    gateway_factory: GatewayFactory, fake_factory: FakeFactory
) -> None:
    dying, healthy = await fake_factory(), await fake_factory()
    dying.behave(die_after=0)  # accepts the request, then the connection drops before any event
    gw = await gateway_factory(
        [(MODEL, "w-dying", dying.url), (MODEL, "w-ok", healthy.url)], health_interval_s=60
    )
    tenant, _key, plain = gw.new_tenant()
    out = await stream_raw(gw.http, plain, chat_body(stream=True))
    assert out.status == 200 and out.done  # nothing had reached the client: the retry is invisible
    assert (
        "".join(e["choices"][0]["delta"].get("content") or "" for e in out.events if e["choices"])
        == " w0 w1 w2"
    )
    assert len(dying.completion_requests()) == 1 and len(healthy.completion_requests()) == 1
    [stored] = gw.events_for(tenant.id)
    assert stored.event.request_id == out.request_id
    assert (stored.event.outcome, stored.event.worker_id, stored.event.completion_tokens) == (
        Outcome.OK,
        "w-ok",
        3,
    )


async def test_only_worker_dying_before_the_first_event_is_502(
    gateway_factory: GatewayFactory, fake_factory: FakeFactory
) -> None:
    dying = await fake_factory()
    dying.behave(die_after=0)
    gw = await gateway_factory([(MODEL, "w-dying", dying.url)], health_interval_s=60)
    tenant, _key, plain = gw.new_tenant()
    async with gw.http.stream(
        "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=auth(plain)
    ) as resp:
        await resp.aread()
    assert_openai_error(resp, 502, type="api_error", code="upstream_error")
    [stored] = gw.events_for(tenant.id)
    assert stored.event.request_id == resp.headers["x-request-id"]
    assert stored.event.outcome is Outcome.UPSTREAM_ERROR and stored.event.completion_tokens == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_no_usage_from_the_worker_is_marked_estimated(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker, stream: bool
) -> None:
    worker.behave(omit_usage=True, tokens=4)
    before = await gateway.metrics()
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        stream=stream,
    )
    parsed = raw.parse()
    if stream:
        chunks = [c async for c in _stream(parsed)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " w0 w1 w2 w3"
    else:
        assert isinstance(parsed, ChatCompletion) and parsed.usage is None
    ev = (await gateway.wait_event(raw.headers["x-request-id"])).event
    assert ev.estimated is True
    assert ev.outcome is Outcome.OK
    after = await gateway.metrics()
    assert (
        metric(after, "tokenport_usage_estimated_total", model=MODEL)
        - metric(before, "tokenport_usage_estimated_total", model=MODEL)
        == 1
    )


async def test_streamed_estimate_counts_generated_tokens(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    worker.behave(omit_usage=True, tokens=4)
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
    )
    _ = [c async for c in _stream(raw.parse())]
    ev = (await gateway.wait_event(raw.headers["x-request-id"])).event
    assert ev.estimated is True
    assert ev.completion_tokens == 4


async def test_non_stream_estimate_is_not_zero(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    worker.behave(omit_usage=True, tokens=4)
    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    ev = (await gateway.wait_event(raw.headers["x-request-id"])).event
    assert ev.estimated is True
    assert ev.prompt_tokens > 0 and ev.completion_tokens > 0


async def test_in_stream_error_event_is_translated_and_metered(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    worker.behave(tokens=8, prompt_tokens=9, error_event_after=3)  # role chunk + 2 tokens, then vLLM's error
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
    )
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in _stream(raw.parse()):
            got += [c.delta.content or "" for c in chunk.choices]
    assert info.value.body == {
        "message": "The worker failed while generating this answer.",  # not vLLM's words
        "type": "api_error",
        "param": None,
        "code": "upstream_error",
    }
    assert "".join(got) == " w0 w1"
    ev = (await gateway.wait_event(raw.headers["x-request-id"])).event
    assert ev.outcome is Outcome.UPSTREAM_ERROR
    assert (ev.prompt_tokens, ev.completion_tokens) == (9, 2)
    await _wait_inflight_zero(gateway)


async def test_non_json_200_from_the_worker_is_502(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    worker.behave(body_override=b"<html>proxy error</html>")
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.status_code == 502
    [stored] = gateway.events_for(tenant.tenant.id)
    assert stored.event.outcome is Outcome.UPSTREAM_ERROR
    assert stored.event.request_id == info.value.request_id


class _SlowUsageStore(UsageStore):
    """A ledger database that takes a while to commit (a busy PostgreSQL, a slow disk)."""

    def append_batch(self, events: Sequence[UsageEvent]) -> list[str]:
        time.sleep(0.4)
        return super().append_batch(events)


async def test_disconnect_during_the_commit_still_moves_the_metrics(
    gateway_factory: GatewayFactory, worker: FakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serving.services.UsageStore", _SlowUsageStore)  # the gateway opens its stores there
    gw = await gateway_factory([(MODEL, "w0", worker.url)])
    tenant, _key, plain = gw.new_tenant()
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with gw.http.stream("POST", "/v1/chat/completions", json=body, headers=auth(plain)) as resp:
        rid = resp.headers["x-request-id"]
        seen = await read_sse(resp, stop_after=5)  # role, 3 tokens, the usage chunk; not [DONE]
        assert seen.events[-1]["choices"] == [] and not seen.done
    ev = (await gw.wait_event(rid)).event
    assert ev.outcome is Outcome.OK and ev.completion_tokens == 3  # the fact is in the ledger ...
    await asyncio.sleep(0.2)
    text = await gw.metrics()
    assert metric(text, "tokenport_requests_total", tenant=tenant.id) == 1  # ... and Prometheus counts it
    assert metric(text, "tokenport_tokens_total", tenant=tenant.id, token_type="output") == 3


async def test_a_worker_dying_mid_stream_is_out_of_the_pool_at_once(
    gateway_factory: GatewayFactory, fake_factory: FakeFactory
) -> None:
    """Marked failed when its stream breaks, not at the next health check (60 s away here): /readyz
    turns 503 for its model and no new request is sent to it."""
    dying = await fake_factory()
    gw = await gateway_factory([(MODEL, "w-only", dying.url)], health_interval_s=60)
    _tenant, _key, plain = gw.new_tenant()
    assert (await gw.http.get("/readyz")).status_code == 200
    dying.behave(tokens=10, die_after=3)
    out = await stream_raw(gw.http, plain, chat_body(stream=True))
    assert out.status == 200 and not out.done
    r = await gw.http.get("/readyz")
    assert_openai_error(r, 503, type="service_unavailable", code="not_ready")
    nxt = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
    assert_openai_error(nxt, 503, code="no_healthy_worker")
    assert len(dying.completion_requests()) == 1


async def test_a_stream_that_fails_before_it_is_relayed_is_still_metered_and_lands(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker already generates when an error strikes between the forward and the relay's start
    (here: the content-log tee): the client gets a 500 in OpenAI's shape, and the worker's connection
    is closed, its output metered (client_cancelled) and its in-flight count dropped — nothing is left
    held until a timeout, no usage is lost."""
    from serving.limits.guard import Guard

    def boom(self: Guard, resp: object, meter: object, raw: bytes) -> object:
        raise RuntimeError("tee failed")

    monkeypatch.setattr(Guard, "log_content", boom)
    worker.behave(tokens=40, prompt_tokens=11, delay_s=0.02)
    r = await gateway.http.post(
        "/v1/chat/completions", json=chat_body(stream=True), headers=auth(tenant.api_key)
    )
    assert_openai_error(r, 500)
    ev = (await gateway.wait_event(r.headers["x-request-id"])).event
    assert ev.outcome is Outcome.CLIENT_CANCELLED and ev.estimated and ev.prompt_tokens > 0  # counted here
    await _wait_inflight_zero(gateway)
