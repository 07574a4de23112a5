"""X-Request-Id: exactly one on every response, and it is the ledger's request id."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy import text

from tests.conftest import MODEL, Gateway, GatewayFactory, TenantKey
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error, auth, chat_body, request_ids, stream_raw


def _one_id(headers: object) -> str:
    ids = headers.get_list("x-request-id")  # type: ignore[attr-defined]
    assert len(ids) == 1, ids
    assert ids[0].startswith("req_") and len(ids[0]) == 36
    return str(ids[0])


async def test_every_response_has_exactly_one_request_id(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    h = gateway.http
    key = auth(tenant.api_key)
    responses = [
        await h.post("/v1/chat/completions", json=chat_body(), headers=key),  # 200
        await h.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=key),  # 200
        await h.post("/v1/chat/completions", json=chat_body()),  # 401
        await h.post("/v1/chat/completions", json=chat_body(model="nope"), headers=key),  # 404
        await h.post("/v1/chat/completions", content=b"{", headers=key),  # 400
        await h.post("/v1/chat/completions", json=chat_body("x" * 10_000), headers=key),  # 413
        await h.get("/no/such/route"),  # 404
        await h.get("/v1/models", headers=key),
        await h.get("/healthz"),
        await h.get("/readyz"),
        await h.get("/metrics"),
    ]
    statuses = [r.status_code for r in responses]
    assert statuses == [
        200,
        200,
        401,
        404,
        400,
        413,
        404,
        200,
        200,
        200,
        404,
    ]  # /metrics: not on the public port
    ids = [_one_id(r.headers) for r in responses]
    assert len(set(ids)) == len(ids)
    # The two completions are in the ledger under the ids the client saw.
    for r in responses[:2]:
        assert (await gateway.wait_event(r.headers["x-request-id"])).event.tenant_id == tenant.tenant.id
    assert sorted(e.event.request_id for e in gateway.events_for(tenant.tenant.id)) == sorted(ids[:2])


async def test_streamed_response_request_id_is_the_ledger_id(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    out = await stream_raw(gateway.http, tenant.api_key, chat_body(stream=True))
    rid = _one_id(out.headers)
    assert out.done
    assert (await gateway.wait_event(rid)).event.stream is True
    assert worker.completion_requests()[0].headers["x-request-id"] == rid


async def test_a_client_supplied_request_id_does_not_duplicate_the_header(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    r = await gateway.http.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers=auth(tenant.api_key, **{"X-Request-Id": "client-chosen"}),
    )
    assert r.status_code == 200
    rid = _one_id(r.headers)
    assert (await gateway.wait_event(rid)).event.tenant_id == tenant.tenant.id


async def test_sdk_exposes_the_request_id(
    gateway: Gateway, client: openai.AsyncOpenAI, worker: FakeWorker, tenant: TenantKey
) -> None:
    done = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert done._request_id is not None
    assert (await gateway.wait_event(done._request_id)).event.tenant_id == tenant.tenant.id
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.request_id is not None and info.value.request_id.startswith("req_")


async def test_unexpected_500_is_openai_shaped_with_a_request_id(
    gateway_factory: GatewayFactory, worker: FakeWorker
) -> None:
    gw = await gateway_factory([(MODEL, "w0", worker.url)])
    _t, _k, plain = gw.new_tenant()  # not yet in the key cache: the first use looks it up in the database
    with gw.engine.begin() as conn:  # the database breaks under the gateway
        conn.execute(text("ALTER TABLE api_keys RENAME TO api_keys_gone"))
    try:
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
    finally:
        with gw.engine.begin() as conn:
            conn.execute(text("ALTER TABLE api_keys_gone RENAME TO api_keys"))
    assert r.status_code == 500
    assert r.json() == {
        "error": {
            "message": "The gateway had an internal error.",
            "type": "api_error",
            "param": None,
            "code": None,
        }
    }
    assert len(request_ids(r)) == 1
    assert_openai_error(r, 500, type="api_error")
