"""Every error is OpenAI-shaped with the right status, and the openai SDK raises the matching class."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from metering.events import Outcome
from serving import errors
from tests.conftest import MODEL, Gateway, TenantKey, metric
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error, auth, chat_body

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


def _status_error(exc: BaseException) -> httpx2.Response:
    assert isinstance(exc, openai.APIStatusError)
    return exc.response


def _assert_nothing_forwarded_or_metered(gateway: Gateway, worker: FakeWorker, tenant: TenantKey) -> None:
    assert worker.completion_requests() == []
    assert gateway.events_for(tenant.tenant.id) == []


# --- the error module itself: the shape is locked ---------------------------------------------
@pytest.mark.parametrize(
    ("cls", "status", "type_", "code"),
    [
        (errors.TokenportError, 500, "api_error", None),
        (errors.InvalidRequest, 400, "invalid_request_error", None),
        (errors.BodyTooLarge, 413, "invalid_request_error", "request_too_large"),
        (errors.InvalidOriginCountry, 400, "invalid_request_error", "invalid_origin_country"),
        (errors.AuthenticationFailed, 401, "invalid_request_error", "invalid_api_key"),
        (errors.PermissionDenied, 403, "permission_error", None),
        (errors.NotFound, 404, "invalid_request_error", None),
        (errors.ModelNotFound, 404, "invalid_request_error", "model_not_found"),
        (errors.Conflict, 409, "invalid_request_error", None),
        (errors.RateLimited, 429, "rate_limit_error", None),
        (errors.UpstreamError, 502, "api_error", "upstream_error"),
        (errors.ServiceUnavailable, 503, "service_unavailable", None),
        (errors.NoHealthyWorker, 503, "service_unavailable", "no_healthy_worker"),
    ],
)
def test_error_classes_render_openai_shape(
    cls: type[errors.TokenportError], status: int, type_: str, code: str | None
) -> None:
    exc = cls("boom", param="p")
    assert exc.status_code == status
    assert exc.body() == {"error": {"message": "boom", "type": type_, "param": "p", "code": code}}
    assert exc.sse_event() == b"data: " + exc.body_bytes() + b"\n\n"
    assert cls("x", code="override").body()["error"]["code"] == "override"


# --- authentication ----------------------------------------------------------------------------
async def test_missing_key_is_401(gateway: Gateway, worker: FakeWorker, tenant: TenantKey) -> None:
    r = await gateway.http.post("/v1/chat/completions", json=chat_body())
    assert_openai_error(r, 401, type="invalid_request_error", code="invalid_api_key")
    r = await gateway.http.post(
        "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Basic abc"}
    )
    assert_openai_error(r, 401, code="invalid_api_key")
    r = await gateway.http.get("/v1/models")
    assert_openai_error(r, 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError) as info:  # the SDK with its Authorization header removed
        await gateway.client("unused").chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"Authorization": openai.Omit()}
        )
    assert "authorization" not in info.value.request.headers
    assert_openai_error(_status_error(info.value), 401, code="invalid_api_key")
    _assert_nothing_forwarded_or_metered(gateway, worker, tenant)


async def test_wrong_key_is_401(gateway: Gateway, worker: FakeWorker, tenant: TenantKey) -> None:
    wrong = tenant.api_key[:-4] + ("aaaa" if not tenant.api_key.endswith("aaaa") else "bbbb")
    with pytest.raises(openai.AuthenticationError) as info:
        await gateway.client(wrong).chat.completions.create(model=MODEL, messages=MESSAGES)
    err = assert_openai_error(
        _status_error(info.value), 401, type="invalid_request_error", code="invalid_api_key"
    )
    assert tenant.api_key not in err["message"]
    assert info.value.request_id == _status_error(info.value).headers["x-request-id"]
    _assert_nothing_forwarded_or_metered(gateway, worker, tenant)


# --- the model ---------------------------------------------------------------------------------
async def test_unknown_model_is_404(
    gateway: Gateway, client: openai.AsyncOpenAI, worker: FakeWorker, tenant: TenantKey
) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-17-ultra", messages=MESSAGES)
    assert_openai_error(
        _status_error(info.value), 404, type="invalid_request_error", code="model_not_found", param="model"
    )
    _assert_nothing_forwarded_or_metered(gateway, worker, tenant)


async def test_model_not_allowed_for_tenant_is_404(gateway: Gateway, worker: FakeWorker) -> None:
    t, _key, plain = gateway.new_tenant(allowed_models=["tiny-other"])
    with pytest.raises(openai.NotFoundError) as info:
        await gateway.client(plain).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert_openai_error(_status_error(info.value), 404, code="model_not_found", param="model")
    # the same tenant may use the model it is allowed
    done = await gateway.client(plain).chat.completions.create(model="tiny-other", messages=MESSAGES)
    assert done.usage is not None and done.usage.completion_tokens == 3
    assert [r.body["model"] for r in worker.completion_requests()] == ["tiny-other"]
    assert [e.event.model for e in gateway.events_for(t.id)] == ["tiny-other"]


# --- the body ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "param"),
    [
        pytest.param(b'{"model": "smollm2-135m-instruct", "messages": [', None, id="truncated-json"),
        pytest.param(b"not json at all", None, id="not-json"),
        pytest.param(b'["model"]', None, id="json-array"),
        pytest.param(b"", None, id="empty"),
    ],
)
async def test_malformed_json_is_400(
    gateway: Gateway, worker: FakeWorker, tenant: TenantKey, content: bytes, param: str | None
) -> None:
    r = await gateway.http.post(
        "/v1/chat/completions",
        content=content,
        headers=auth(tenant.api_key, **{"Content-Type": "application/json"}),
    )
    assert_openai_error(r, 400, type="invalid_request_error", param=param)
    _assert_nothing_forwarded_or_metered(gateway, worker, tenant)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"model": MODEL}, "messages", id="missing-messages"),
        pytest.param({"model": MODEL, "messages": []}, "messages", id="empty-messages"),
        pytest.param({"messages": MESSAGES}, "model", id="missing-model"),
        pytest.param({"model": MODEL, "messages": MESSAGES, "n": 1000}, "n", id="n-1000"),
        pytest.param(
            {"model": MODEL, "messages": MESSAGES, "temperature": 7}, "temperature", id="temperature"
        ),
        pytest.param(
            {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, "max_tokens", id="max-tokens-0"
        ),
    ],
)
async def test_invalid_chat_body_is_400_before_the_worker(
    gateway: Gateway,
    client: openai.AsyncOpenAI,
    worker: FakeWorker,
    tenant: TenantKey,
    body: dict[str, Any],
    param: str,
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.post("/chat/completions", cast_to=ChatCompletion, body=body)
    err = assert_openai_error(_status_error(info.value), 400, type="invalid_request_error", param=param)
    assert param in err["message"]
    _assert_nothing_forwarded_or_metered(gateway, worker, tenant)


async def test_n_1000_with_the_sdk_is_400(
    gateway: Gateway, client: openai.AsyncOpenAI, worker: FakeWorker, tenant: TenantKey
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=1000)
    assert_openai_error(_status_error(info.value), 400, param="n")
    _assert_nothing_forwarded_or_metered(gateway, worker, tenant)


async def test_completions_without_prompt_is_400(
    gateway: Gateway, client: openai.AsyncOpenAI, worker: FakeWorker, tenant: TenantKey
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.post("/completions", cast_to=ChatCompletion, body={"model": MODEL})
    assert_openai_error(_status_error(info.value), 400, param="prompt")
    _assert_nothing_forwarded_or_metered(gateway, worker, tenant)


async def test_body_over_the_limit_is_413(
    gateway: Gateway, client: openai.AsyncOpenAI, worker: FakeWorker, tenant: TenantKey
) -> None:
    limit = gateway.settings.gateway.max_body_bytes
    big = "x" * (limit + 1)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": big}])
    assert info.value.status_code == 413
    assert_openai_error(
        _status_error(info.value), 413, type="invalid_request_error", code="request_too_large"
    )

    # Without Content-Length (chunked upload) the limit holds while reading.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "'
        for _ in range(limit // 1024 + 2):
            yield b"y" * 1024
        yield b'"}]}'

    r = await gateway.http.post(
        "/v1/chat/completions",
        content=chunks(),
        headers=auth(tenant.api_key, **{"Content-Type": "application/json"}),
    )
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, code="request_too_large")
    # Just under the limit is fine.
    ok_body = chat_body("z" * (limit - 200))
    r = await gateway.http.post("/v1/chat/completions", json=ok_body, headers=auth(tenant.api_key))
    assert r.status_code == 200, r.text
    assert len(worker.completion_requests()) == 1
    assert len(gateway.events_for(tenant.tenant.id)) == 1


@pytest.mark.parametrize("value", ["XX", "USA", "1", "D3", "", "zz"])
async def test_malformed_origin_country_header_is_400(
    gateway: Gateway, client: openai.AsyncOpenAI, worker: FakeWorker, tenant: TenantKey, value: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            extra_headers={"X-Client-Country": value},
        )
    assert_openai_error(
        _status_error(info.value),
        400,
        type="invalid_request_error",
        code="invalid_origin_country",
        param="x-client-country",
    )
    _assert_nothing_forwarded_or_metered(gateway, worker, tenant)


# --- the worker's answers ----------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
async def test_worker_500_is_502_and_metered_as_upstream_error(
    gateway: Gateway, client: openai.AsyncOpenAI, worker: FakeWorker, tenant: TenantKey, stream: bool
) -> None:
    worker.behave(
        status=500,
        error_body={
            "error": {"message": "engine dead", "type": "InternalServerError", "param": None, "code": 500}
        },
    )
    before = await gateway.metrics()
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
    resp = _status_error(info.value)
    assert_openai_error(resp, 502, type="api_error", code="upstream_error")
    assert len(worker.completion_requests()) == 1  # no retry after the worker answered
    [stored] = gateway.events_for(tenant.tenant.id)
    ev = stored.event
    assert ev.request_id == resp.headers["x-request-id"]
    assert ev.outcome is Outcome.UPSTREAM_ERROR and ev.stream is stream
    assert (ev.prompt_tokens, ev.completion_tokens) == (0, 0)
    after = await gateway.metrics()
    assert (
        metric(after, "tokenport_requests_total", tenant=tenant.tenant.id, outcome="upstream_error")
        - metric(before, "tokenport_requests_total", tenant=tenant.tenant.id, outcome="upstream_error")
        == 1
    )
    # A worker that answers (even with 500) is not taken out of the pool.
    worker.behave(status=200)
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert done.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
async def test_worker_400_keeps_its_status_in_our_words_and_is_metered_as_rejected(
    gateway: Gateway, client: openai.AsyncOpenAI, worker: FakeWorker, tenant: TenantKey, stream: bool
) -> None:
    worker.behave(status=400)  # vLLM's {"error": {"message": "max_tokens too large", ...}}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=stream,
            max_tokens=100_000,
        )
    resp = _status_error(info.value)
    err = assert_openai_error(resp, 400, type="invalid_request_error", code="upstream_rejected")
    assert err["message"] == (
        "The model refused this request (HTTP 400): a parameter is not supported or is "
        "out of range for this model."
    )
    assert "max_tokens too large" not in resp.text  # vLLM's own text never reaches the client
    [stored] = gateway.events_for(tenant.tenant.id)
    ev = stored.event
    assert ev.request_id == resp.headers["x-request-id"]
    assert ev.outcome is Outcome.REJECTED and ev.stream is stream
    assert (ev.prompt_tokens, ev.cached_prompt_tokens, ev.completion_tokens) == (0, 0, 0)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        pytest.param(
            422,
            b'{"message": "old style", "type": "BadRequestError", "param": null, "code": 400}',
            "upstream_rejected",
            id="flat",
        ),
        pytest.param(422, b"plain text failure", "upstream_rejected", id="text"),
        pytest.param(400, b'{"error": {"message": "partial"}}', "upstream_rejected", id="partial"),
        pytest.param(
            400,
            b'{"error": {"message": "This model\'s maximum context length is 2048 tokens. '
            b'However, you requested 3000 tokens", "type": "BadRequestError", "param": null, '
            b'"code": 400}}',
            "context_length_exceeded",
            id="context",
        ),
    ],
)
async def test_worker_4xx_bodies_are_told_in_openai_shape_and_our_words(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker, status: int, body: bytes, code: str
) -> None:
    worker.behave(status=status, error_body=body)
    r = await gateway.http.post("/v1/chat/completions", json=chat_body(), headers=auth(tenant.api_key))
    err = assert_openai_error(r, status, type="invalid_request_error", code=code)
    assert err["param"] is None
    for worker_text in (b"old style", b"plain text", b"partial", b"2048", b"BadRequestError"):
        assert worker_text not in r.content
    [stored] = gateway.events_for(tenant.tenant.id)
    assert stored.event.outcome is Outcome.REJECTED


# --- routes ------------------------------------------------------------------------------------
async def test_unknown_route_and_method_are_openai_shaped(gateway: Gateway, tenant: TenantKey) -> None:
    r = await gateway.http.get("/v1/nope", headers=auth(tenant.api_key))
    assert_openai_error(r, 404, type="invalid_request_error", code="unknown_route")
    r = await gateway.http.post("/nothing/here")
    assert_openai_error(r, 404, code="unknown_route")
    r = await gateway.http.get("/v1/chat/completions", headers=auth(tenant.api_key))
    assert_openai_error(r, 405, type="invalid_request_error")
