"""The completion pipeline (serving/pipeline.py): what it does before any worker runs."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import orjson

from tests.conftest import Gateway, TenantKey
from tests.fakes import FakeWorker

MODEL = "smollm2-135m-instruct"


async def test_unknown_caller_is_refused_before_its_body_is_read(
    gateway: Gateway, worker: FakeWorker
) -> None:
    """401, not 413: an unauthenticated client never makes the gateway read (or hold) a body."""
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    r = await gateway.http.post(
        "/v1/chat/completions",
        content=big,
        headers={"Authorization": "Bearer sk-nope", "Content-Type": "application/json"},
    )
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-request-id"].startswith("req_")
    assert worker.completion_requests() == []


async def test_client_gone_before_its_body_is_complete_is_not_forwarded(
    gateway: Gateway, worker: FakeWorker, tenant: TenantKey
) -> None:
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]})
    url = urlsplit(gateway.url)
    _reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + tenant.api_key.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(body) + 10) + body
    )  # 10 bytes never come
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.3)
    assert worker.completion_requests() == []
    assert gateway.events_for(tenant.tenant.id) == []
    # and the gateway still serves
    r = await gateway.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]},
        headers={"Authorization": f"Bearer {tenant.api_key}"},
    )
    assert r.status_code == 200
