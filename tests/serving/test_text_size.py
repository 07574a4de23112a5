"""Every usage event records the characters and UTF-8 bytes of its prompt and of the completion it
billed (never the text): whole answers, streams, completions, and a stream cut by its worker."""

from __future__ import annotations

import pytest

from metering.events import Outcome
from tests.conftest import MODEL, Gateway, TenantKey
from tests.fakes import FakeWorker
from tests.serving.helpers import auth, chat_body, stream_raw

KAZAKH = "Сәлеметсіз бе, бұл қанша тұрады?"  # 32 characters, Cyrillic: two bytes a letter


def _sizes(gateway: Gateway, rid: str) -> tuple[int | None, ...]:
    e = gateway.usage.get(rid)
    assert e is not None
    ev = e.event
    return ev.prompt_chars, ev.prompt_bytes, ev.completion_chars, ev.completion_bytes


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_prompt_and_completion_sizes(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker, stream: bool
) -> None:
    worker.behave(tokens=3)  # generates " w0 w1 w2": 9 characters
    body = chat_body(KAZAKH, stream=stream)
    body["messages"].insert(0, {"role": "system", "content": [{"type": "text", "text": "Be brief."}]})
    if stream:
        out = await stream_raw(gateway.http, tenant.api_key, body)
        assert out.done
        rid = out.request_id
    else:
        r = await gateway.http.post("/v1/chat/completions", json=body, headers=auth(tenant.api_key))
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
    await gateway.wait_event(rid)
    prompt = "Be brief.\n" + KAZAKH  # the messages' text content, as the token counter joins it
    assert _sizes(gateway, rid) == (len(prompt), len(prompt.encode()), 9, 9)


async def test_completions_prompt_size(gateway: Gateway, tenant: TenantKey, worker: FakeWorker) -> None:
    worker.behave(tokens=2)
    r = await gateway.http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "你好，世界"}, headers=auth(tenant.api_key)
    )
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    await gateway.wait_event(rid)
    assert _sizes(gateway, rid) == (5, 15, 6, 6)


async def test_a_cut_stream_counts_what_was_relayed(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    worker.behave(tokens=10, die_after=4)  # the role chunk and three tokens, then the worker is gone
    out = await stream_raw(gateway.http, tenant.api_key, chat_body("Count to ten please", stream=True))
    relayed = "".join(e["choices"][0]["delta"].get("content") or "" for e in out.events if e.get("choices"))
    assert relayed == " w0 w1 w2"
    ev = await gateway.wait_event(out.request_id)
    assert ev.event.outcome is Outcome.UPSTREAM_ERROR
    assert _sizes(gateway, out.request_id) == (19, 19, 9, 9)
