"""POST /v1/responses through the one pipeline (fake worker): usage from the body or from
`response.completed`, typed events relayed unchanged, cut streams, worker failures, idempotency,
`store` forced off, `background` refused, the max_output_tokens cap."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from metering.events import Outcome
from tests.conftest import MODEL, Gateway
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error, auth
from tests.serving.limits_support import guarded_gateway, set_limits


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with guarded_gateway(tmp_path_factory.mktemp("responses"), [(MODEL, "f0", fake.url)]) as g:
        yield g


def body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "Say hello", **extra}


async def raw_events(
    gw: Gateway,
    api_key: str,
    payload: dict[str, Any],
    *,
    stop_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[str, bytes]:
    """(request id, the raw stream bytes), optionally leaving after `stop_after` events."""
    got = b""
    async with gw.http.stream(
        "POST", "/v1/responses", json=payload, headers=auth(api_key, **(headers or {}))
    ) as resp:
        assert resp.status_code == 200, await resp.aread()
        rid = resp.headers["x-request-id"]
        async for chunk in resp.aiter_bytes():
            got += chunk
            if stop_after is not None and got.count(b"\n\n") >= stop_after:
                break
    return rid, got


async def test_the_official_client_non_streamed(gw: Gateway, worker: FakeWorker) -> None:
    _t, _k, api_key = gw.new_tenant()
    worker.behave(tokens=4, prompt_tokens=21, cached_tokens=5)
    got = await gw.client(api_key).responses.create(model=MODEL, input="Say hello", store=True)
    assert got.output_text == " w0 w1 w2 w3"
    assert got.usage is not None and got.usage.input_tokens == 21
    sent = worker.completion_requests()[-1]
    assert sent.path == "/v1/responses" and sent.body["store"] is False  # no content logging: never stored
    assert "stream_options" not in sent.body
    [ev] = [e.event for e in gw.events_for(_t.id)]
    assert (ev.endpoint, ev.prompt_tokens, ev.cached_prompt_tokens, ev.completion_tokens) == (
        "responses",
        21,
        5,
        4,
    )
    assert ev.outcome is Outcome.OK and not ev.estimated and not ev.stream


async def test_the_official_client_streams_and_usage_comes_from_response_completed(
    gw: Gateway, worker: FakeWorker
) -> None:
    t, _k, api_key = gw.new_tenant()
    worker.behave(tokens=3, prompt_tokens=17)
    stream = await gw.client(api_key).responses.create(model=MODEL, input="Say hello", stream=True)
    kinds = [e.type async for e in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 3
    [ev] = [e.event for e in gw.events_for(t.id)]
    assert (ev.prompt_tokens, ev.completion_tokens, ev.stream, ev.outcome) == (17, 3, True, Outcome.OK)
    assert not ev.estimated


async def test_events_are_relayed_byte_for_byte(gw: Gateway, worker: FakeWorker) -> None:
    _t, _k, api_key = gw.new_tenant()
    worker.behave(tokens=2)
    _rid, got = await raw_events(gw, api_key, body(stream=True))
    events = got.split(b"\n\n")[:-1]
    assert all(e.startswith(b"event: response.") and b"\ndata: {" in e for e in events)
    assert events[-1].startswith(b"event: response.completed\n") and b"[DONE]" not in got


async def test_a_client_that_leaves_is_billed_what_was_generated(gw: Gateway, worker: FakeWorker) -> None:
    _t, _k, api_key = gw.new_tenant()
    worker.behave(tokens=40, delay_s=0.02, prompt_tokens=9)
    rid, _got = await raw_events(gw, api_key, body(stream=True), stop_after=5)
    ev = (await gw.wait_event(rid)).event
    assert ev.outcome is Outcome.CLIENT_CANCELLED and ev.estimated
    assert 1 <= ev.completion_tokens < 40 and ev.prompt_tokens > 0
    [rec] = worker.completion_requests()
    for _ in range(40):
        if rec.aborted:
            break
        await asyncio.sleep(0.05)
    assert rec.aborted and not rec.finished


async def test_a_worker_dying_mid_stream_is_an_sse_error_and_keeps_what_it_made(
    gw: Gateway, worker: FakeWorker
) -> None:
    _t, _k, api_key = gw.new_tenant()
    worker.behave(tokens=10, die_after=6)
    rid, got = await raw_events(gw, api_key, body(stream=True))
    assert got.endswith(b"\n\n") and b'"error"' in got.split(b"\n\n")[-2]
    assert b"response.completed" not in got
    ev = (await gw.wait_event(rid)).event
    assert ev.outcome is Outcome.UPSTREAM_ERROR and ev.completion_tokens == 4  # 2 head events + 4 deltas
    for _ in range(100):  # the broken worker left the pool: back at its next health check
        if (await gw.http.get("/readyz")).status_code == 200:
            break
        await asyncio.sleep(0.05)


async def test_idempotency_replays_a_whole_stream_and_consumes_a_cut_one(
    gw: Gateway, worker: FakeWorker
) -> None:
    _t, _k, api_key = gw.new_tenant()
    key = uuid.uuid4().hex
    worker.behave(tokens=3)
    rid, first = await raw_events(gw, api_key, body(stream=True), headers={"Idempotency-Key": key})
    await asyncio.sleep(0.2)
    r = await gw.http.post(
        "/v1/responses", json=body(stream=True), headers=auth(api_key, **{"Idempotency-Key": key})
    )
    assert r.status_code == 200 and r.content == first and r.headers["idempotent-replayed"] == "true"
    assert r.headers["x-request-id"] == rid and len(worker.completion_requests()) == 1
    worker.behave(tokens=40, delay_s=0.02)
    cut_key = uuid.uuid4().hex
    await raw_events(gw, api_key, body(stream=True), stop_after=4, headers={"Idempotency-Key": cut_key})
    await asyncio.sleep(0.3)
    again = await gw.http.post(
        "/v1/responses", json=body(stream=True), headers=auth(api_key, **{"Idempotency-Key": cut_key})
    )
    assert_openai_error(again, 409, code="idempotency_key_consumed")


async def test_validation_background_and_the_output_cap(gw: Gateway, worker: FakeWorker) -> None:
    t, _k, api_key = gw.new_tenant()
    h = auth(api_key)
    assert_openai_error(
        await gw.http.post("/v1/responses", json=body(background=True), headers=h), 400, param="background"
    )
    assert_openai_error(
        await gw.http.post("/v1/responses", json=body(priority=5), headers=h), 400, param="priority"
    )
    assert_openai_error(
        await gw.http.post("/v1/responses", json={"model": MODEL}, headers=h), 400, param="input"
    )
    assert worker.completion_requests() == []
    await set_limits(gw, t.id, max_tokens=64)
    over = await gw.http.post("/v1/responses", json=body(max_output_tokens=100), headers=h)
    assert_openai_error(over, 400, param="max_output_tokens")
    ok = await gw.http.post("/v1/responses", json=body(), headers=h)
    assert ok.status_code == 200
    sent = worker.completion_requests()[-1].body
    assert sent["max_output_tokens"] == 64 and "max_tokens" not in sent


async def _stored(gw: Gateway, api_key: str, rid: str) -> Any:
    for _ in range(100):  # stored after the answer went out
        r = await gw.http.get(f"/v1/responses/{rid}", headers=auth(api_key))
        if r.status_code == 200:
            return r.json()
        await asyncio.sleep(0.02)
    return r


async def test_responses_are_stored_by_the_gateway_only_for_a_tenant_that_logs_content(
    gw: Gateway, worker: FakeWorker
) -> None:
    """The worker never stores (`store: false` always). The gateway keeps the final object for GET/DELETE
    /v1/responses/{id} when the tenant logs content and the request did not say `store: false`."""
    t, _k, api_key = gw.new_tenant()
    other = gw.new_tenant()[2]
    await set_limits(gw, t.id, content_logging=True)
    client = gw.client(api_key)
    plain = await client.responses.create(model=MODEL, input="Say hello")  # store: OpenAI's default true
    assert worker.completion_requests()[-1].body["store"] is False
    got = await _stored(gw, api_key, plain.id)
    assert got["id"] == plain.id and got["status"] == "completed"
    assert (await client.responses.retrieve(plain.id)).output_text == plain.output_text
    stream = await client.responses.create(model=MODEL, input="Say hello", stream=True)
    done = [e async for e in stream][-1]
    assert done.type == "response.completed"
    assert worker.completion_requests()[-1].body["store"] is False
    kept = await _stored(gw, api_key, done.response.id)
    assert kept["id"] == done.response.id and kept["status"] == "completed" and kept["usage"]
    # another tenant sees nothing, and cannot delete it
    assert_openai_error(await gw.http.get(f"/v1/responses/{plain.id}", headers=auth(other)), 404)
    assert_openai_error(await gw.http.delete(f"/v1/responses/{plain.id}", headers=auth(other)), 404)
    deleted = await gw.http.delete(f"/v1/responses/{plain.id}", headers=auth(api_key))
    assert deleted.json() == {"id": plain.id, "object": "response", "deleted": True}
    assert_openai_error(await gw.http.get(f"/v1/responses/{plain.id}", headers=auth(api_key)), 404)
    # store: false is not kept; without content logging nothing is
    off = await client.responses.create(model=MODEL, input="Say hello", store=False)
    await asyncio.sleep(0.2)
    assert_openai_error(await gw.http.get(f"/v1/responses/{off.id}", headers=auth(api_key)), 404)
    await set_limits(gw, t.id, content_logging=False)
    unlogged = await client.responses.create(model=MODEL, input="Say hello", store=True)
    await asyncio.sleep(0.2)
    assert_openai_error(await gw.http.get(f"/v1/responses/{unlogged.id}", headers=auth(api_key)), 404)
    assert (await gw.http.get(f"/v1/responses/{plain.id}")).status_code == 401


async def test_a_responses_input_carries_its_language_and_size(gw: Gateway, worker: FakeWorker) -> None:
    """The Responses input is read as the messages it becomes: the event has its language and text size
    (before, it was `und` with no size)."""
    _t, _k, api_key = gw.new_tenant()
    text = "Біз келісімшартымызды сол шарттармен тағы бір жылға ұзартқымыз келеді."
    worker.behave(tokens=2)
    r = await gw.http.post("/v1/responses", json=body(input=text), headers=auth(api_key))
    assert r.status_code == 200, r.text
    ev = (await gw.wait_event(r.headers["x-request-id"])).event
    assert ev.language == "kk" and ev.prompt_chars == len(text)
