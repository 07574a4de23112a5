"""Idempotency-Key: a retry never runs (or bills) a request twice; the first answer is replayed."""

from __future__ import annotations

import asyncio
import uuid

from metering.events import Outcome
from tests.conftest import MODEL, Gateway, GatewayFactory, TenantKey
from tests.fakes import FakeWorker
from tests.serving.helpers import auth, chat_body, read_sse, stream_raw


def key() -> str:
    return "idem-" + uuid.uuid4().hex


async def _events(gateway: Gateway, tenant: TenantKey) -> list[str]:
    await asyncio.sleep(0.05)
    return [s.event.request_id for s in gateway.events_for(tenant.tenant.id)]


async def test_retry_gets_the_first_answer_and_is_billed_once(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    k = key()
    body = chat_body("Name a colour", max_tokens=5)
    first = await gateway.http.post(
        "/v1/chat/completions", json=body, headers=auth(tenant.api_key, **{"Idempotency-Key": k})
    )
    await asyncio.sleep(0.1)  # the answer is stored just after it is sent
    again = await gateway.http.post(
        "/v1/chat/completions", json=body, headers=auth(tenant.api_key, **{"Idempotency-Key": k})
    )
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert len(worker.completion_requests()) == 1
    assert await _events(gateway, tenant) == [first.headers["x-request-id"]]


async def test_concurrent_retries_run_the_request_once(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    worker.behave(delay_s=0.05, tokens=4)
    k = key()
    body = chat_body("Tell me", stream=True)

    async def one() -> tuple[int, str]:
        async with gateway.http.stream(
            "POST", "/v1/chat/completions", json=body, headers=auth(tenant.api_key, **{"Idempotency-Key": k})
        ) as r:
            await r.aread()
            return r.status_code, r.headers["x-request-id"]

    results = await asyncio.gather(*(one() for _ in range(6)))
    ok = [rid for status, rid in results if status == 200]
    assert len(ok) == 1 and sorted(s for s, _ in results) == [200] + [409] * 5
    assert len(worker.completion_requests()) == 1
    await asyncio.sleep(0.1)
    replay = await stream_raw(gateway.http, tenant.api_key, body, **{"Idempotency-Key": k})
    assert replay.status == 200 and replay.done and replay.request_id == ok[0]
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in replay.events if e["choices"])
        == " w0 w1 w2 w3"
    )
    assert len(worker.completion_requests()) == 1
    assert await _events(gateway, tenant) == ok


async def test_same_key_with_another_body_is_400(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    k = key()
    h = auth(tenant.api_key, **{"Idempotency-Key": k})
    assert (
        await gateway.http.post("/v1/chat/completions", json=chat_body("a"), headers=h)
    ).status_code == 200
    r = await gateway.http.post("/v1/chat/completions", json=chat_body("b"), headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "idempotency_key_reused"
    # keys are per tenant: another tenant may use the same string
    _t, _k, other = gateway.new_tenant()
    r = await gateway.http.post(
        "/v1/chat/completions", json=chat_body("b"), headers=auth(other, **{"Idempotency-Key": k})
    )
    assert r.status_code == 200


async def test_a_cut_off_billed_stream_consumes_the_key(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    worker.behave(tokens=50, delay_s=0.02)
    k = key()
    body = chat_body("Long story", stream=True)
    async with gateway.http.stream(
        "POST", "/v1/chat/completions", json=body, headers=auth(tenant.api_key, **{"Idempotency-Key": k})
    ) as resp:
        first = await read_sse(resp, stop_after=3)
    ev = (await gateway.wait_event(first.request_id)).event
    assert ev.outcome is Outcome.CLIENT_CANCELLED and ev.completion_tokens > 0
    await asyncio.sleep(0.1)
    r = await gateway.http.post(
        "/v1/chat/completions", json=body, headers=auth(tenant.api_key, **{"Idempotency-Key": k})
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_consumed"
    assert first.request_id in r.json()["error"]["message"]
    assert len(worker.completion_requests()) == 1


async def test_a_failure_billed_nothing_releases_the_key(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    k = key()
    h = auth(tenant.api_key, **{"Idempotency-Key": k})
    worker.behave(status=500, error_body={"error": {"message": "boom"}})
    assert (await gateway.http.post("/v1/chat/completions", json=chat_body(), headers=h)).status_code == 502
    worker.behave(status=200)
    await asyncio.sleep(0.1)
    r = await gateway.http.post("/v1/chat/completions", json=chat_body(), headers=h)
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers
    assert len(worker.completion_requests()) == 2


async def test_a_request_refused_before_any_worker_releases_the_key(
    gateway_factory: GatewayFactory, fake_factory: object
) -> None:
    w: FakeWorker = await fake_factory()  # type: ignore[operator]
    gw = await gateway_factory([(MODEL, "solo", w.url)])
    _t, _k, api_key = gw.new_tenant()
    h = auth(api_key, **{"Idempotency-Key": key()})
    w.behave(health_status=503)
    deadline = asyncio.get_running_loop().time() + 5
    while (await gw.http.get("/readyz")).status_code != 503:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=h)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
    w.behave(health_status=200)
    await asyncio.sleep(0.5)
    r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=h)
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers


async def test_invalid_key_is_400(gateway: Gateway, tenant: TenantKey) -> None:
    r = await gateway.http.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers=auth(tenant.api_key, **{"Idempotency-Key": "x" * 300}),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"


async def test_a_replayed_stream_has_the_first_streams_bytes_and_content_type(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    k = key()
    body = chat_body("Stream it", stream=True)
    first = await stream_raw(gateway.http, tenant.api_key, body, **{"Idempotency-Key": k})
    await asyncio.sleep(0.1)  # the answer is stored just after it is sent
    again = await stream_raw(gateway.http, tenant.api_key, body, **{"Idempotency-Key": k})
    assert first.done and again.done and again.request_id == first.request_id
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.events == first.events
    assert len(worker.completion_requests()) == 1
