"""Hostile input: oversized, deep, malformed or absurd requests each get a clear 4xx in OpenAI's shape,
and slow clients (slowloris: heads or bodies sent byte by byte, idle connections) are cut off while
the gateway keeps serving everyone else."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

from serving.app import create_app
from serving.limits.http_timeouts import uvicorn_options
from serving.settings import load_settings
from tests.conftest import MODEL, write_config
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error
from tests.serving.limits_support import ADMIN, bearer, chat

MAX_BODY = 16_384


@dataclass
class Server:
    url: str
    port: int
    app: FastAPI
    api_key: str
    http: httpx.AsyncClient


@pytest.fixture(scope="module")
async def srv(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """The gateway served exactly as `tokenport gateway` serves it (guarded protocol), short deadlines."""
    directory = tmp_path_factory.mktemp("hostile")
    gw = {
        "max_body_bytes": MAX_BODY,
        "header_timeout_s": 1.0,
        "body_timeout_s": 1.0,
        "max_header_bytes": 8192,
        "keep_alive_s": 1.0,
    }
    settings = load_settings(
        config_file=write_config(directory, [(MODEL, "f0", fake.url)], health_interval_s=0.2, gateway=gw)
    )
    app = create_app(settings)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    g = settings.gateway
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        **uvicorn_options(g.header_timeout_s, g.max_header_bytes, g.keep_alive_s, None),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.post(
            "/admin/v1/tenants", headers=ADMIN, json={"id": "hostile", "name": "H", "billing_country": "DE"}
        )
        assert r.status_code == 201
        key = (await http.post("/admin/v1/tenants/hostile/keys", headers=ADMIN, json={})).json()["key"]
        try:
            yield Server(url, port, app, key, http)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 15)
            sock.close()


async def post(srv: Server, body: Any, path: str = "/v1/chat/completions", **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await srv.http.post(
        path, content=content, headers={**bearer(srv.api_key), "Content-Type": "application/json"}, **kw
    )


# --- bodies -------------------------------------------------------------------------------
async def test_body_size_limit_with_and_without_content_length(srv: Server, worker: FakeWorker) -> None:
    big = orjson.dumps(chat("x" * (MAX_BODY + 10)))
    assert_openai_error(await post(srv, big), 413, code="request_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = await srv.http.post("/v1/chat/completions", content=chunks(), headers=bearer(srv.api_key))
    assert_openai_error(r, 413)
    r = await srv.http.post(
        "/admin/v1/tenants", content=big, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert r.status_code == 413  # every route, before FastAPI reads a byte
    assert worker.completion_requests() == []


@pytest.mark.parametrize(
    "raw, code",
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_utf8"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_utf8"),
        (b'{"model": "m", "messages": [', None),
        (b"[" * 3000 + b"]" * 3000, None),
        (b'"just a string"', None),
        (b"", None),
    ],
)
async def test_malformed_json_is_400(srv: Server, raw: bytes, code: str | None) -> None:
    err = assert_openai_error(await post(srv, raw), 400, type="invalid_request_error")
    if code:
        assert err["code"] == code


def nest(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "body, param",
    [
        (chat(max_tokens=4, response_format=nest(40)), "response_format.a.a.a"),
        (chat(max_tokens=4, logit_bias={str(i): 1 for i in range(1100)}), "logit_bias"),
        (
            {
                **chat(max_tokens=4),
                "messages": [{"role": "user", "content": "x", **{f"f{i}": i for i in range(1100)}}],
            },
            "messages.0",
        ),
    ],
)
async def test_json_depth_and_field_limits(
    srv: Server, worker: FakeWorker, body: dict[str, Any], param: str
) -> None:
    err = assert_openai_error(await post(srv, body), 400, code="invalid_json_shape")
    assert (err["param"] or "").startswith(param.split(".")[0])
    assert worker.completion_requests() == []


@pytest.mark.parametrize(
    "field",
    [
        "foo",
        "priority",
        "chat_template",
        "logits_processors",
        "kv_transfer_params",
        "request_id",
        "prompt_logprobs",
        "vllm_xargs",
    ],
)
async def test_unknown_and_worker_internal_fields_are_refused(
    srv: Server, worker: FakeWorker, field: str
) -> None:
    err = assert_openai_error(await post(srv, chat(max_tokens=4, **{field: 1})), 400, param=field)
    assert err["message"] == f"Unrecognized request argument supplied: {field}"
    assert worker.completion_requests() == []


async def test_known_vllm_sampling_extras_pass_through(srv: Server, worker: FakeWorker) -> None:
    r = await post(srv, chat(max_tokens=4, top_k=5, min_p=0.1, repetition_penalty=1.1, seed=7))
    assert r.status_code == 200
    assert worker.completion_requests()[-1].body["top_k"] == 5


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"n": 1000}, "n"),
        ({"n": "4"}, "n"),
        ({"top_logprobs": 1000, "logprobs": True}, "top_logprobs"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": 1e308}, "temperature"),
        ({"stream": "false"}, "stream"),
        ({"stop": ["x"] * 100}, "stop"),
        ({"user": "u" * 10_000}, "user"),
    ],
)
async def test_absurd_parameters_are_400(
    srv: Server, worker: FakeWorker, extra: dict[str, Any], param: str
) -> None:
    assert_openai_error(await post(srv, chat(**extra)), 400, param=param)
    assert worker.completion_requests() == []


async def test_absurd_completions_parameters_are_400(srv: Server, worker: FakeWorker) -> None:
    for extra, param in (
        ({"logprobs": 100}, "logprobs"),
        ({"best_of": 1000}, "best_of"),
        ({"prompt": []}, "prompt"),
        ({"suffix": 5}, "suffix"),
    ):
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **extra}
        assert_openai_error(await post(srv, body, "/v1/completions"), 400, param=param)
    assert worker.completion_requests() == []


# --- slow clients ---------------------------------------------------------------------------
async def _read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(65536), timeout)
    except (TimeoutError, ConnectionError):
        return b""


async def test_slowloris_heads_are_cut_off_and_others_are_served(srv: Server, worker: FakeWorker) -> None:
    async def slow_client() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        t0 = time.monotonic()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        data = b""
        try:
            for _ in range(40):  # one header byte every 0.1 s: never finishes within the deadline
                writer.write(b"X")
                await writer.drain()
                chunk = await _read_all(reader, 0.1)
                if chunk:
                    data += chunk
                    break
        except ConnectionError:
            pass
        data += await _read_all(reader, 0.5)
        writer.close()
        return data, time.monotonic() - t0

    async def idle_client() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        t0 = time.monotonic()
        data = await _read_all(reader, 4)
        writer.close()
        return data, time.monotonic() - t0

    slow = [asyncio.create_task(slow_client()) for _ in range(150)] + [
        asyncio.create_task(idle_client()) for _ in range(50)
    ]
    await asyncio.sleep(0.2)
    latencies = []
    for _ in range(5):  # meanwhile, an honest client is served promptly
        t0 = time.monotonic()
        r = await post(srv, chat(max_tokens=4))
        assert r.status_code == 200
        latencies.append(time.monotonic() - t0)
    assert max(latencies) < 1.5
    results = await asyncio.gather(*slow)
    for data, elapsed in results:
        assert 0.8 < elapsed < 3.0, elapsed  # dropped at the 1 s head deadline, not left open
        assert data.startswith(b"HTTP/1.1 408") or data == b""
    assert sum(d.startswith(b"HTTP/1.1 408") for d, _ in results) >= 150
    assert b'"code":"request_timeout"' in results[0][0]


async def test_oversized_request_head_is_431(srv: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(100))
    )
    await writer.drain()
    data = await _read_all(reader, 3)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize("size", [12_000, 100_000])
async def test_a_whole_oversized_head_in_one_write_is_431(srv: Server, size: int) -> None:
    """The cap is on the bytes received: a complete head over it is refused even when it arrives whole."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * size + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(head)
    await writer.drain()
    data = await _read_all(reader, 3)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:100]
    body = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "headers_too_large" and set(body["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


async def test_heads_under_the_cap_are_served_with_their_bodies_and_pipelined(srv: Server) -> None:
    body = orjson.dumps(chat(max_tokens=4))
    post_head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.api_key}\r\n"
        f"Content-Type: application/json\r\nX-Pad: {'p' * 7000}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    assert len(post_head) < 8192
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"q" * 7000 + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(post_head + body + get)  # one write: over the cap in total, each head under it
    await writer.drain()
    data = b""
    deadline = time.monotonic() + 5
    while data.count(b"HTTP/1.1 200") < 2 and time.monotonic() < deadline:
        data += await _read_all(reader, 0.3)
    writer.close()
    assert data.count(b"HTTP/1.1 200") == 2 and b"HTTP/1.1 431" not in data, data[:300]


async def test_slow_body_is_408_in_openai_shape(srv: Server, worker: FakeWorker) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    writer.write(head + b'{"model": ')
    await writer.drain()
    data = b""
    while time.monotonic() - t0 < 4 and b"\r\n\r\n" not in data:
        writer.write(b" ")
        try:
            await writer.drain()
        except ConnectionError:
            break
        data += await _read_all(reader, 0.2)
    data += await _read_all(reader, 0.5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert 0.9 < time.monotonic() - t0 < 3
    body = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and set(body["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert b"x-request-id" in data.lower() and b"connection: close" in data.lower()
    assert worker.completion_requests() == []


async def test_idle_keep_alive_connections_are_closed(srv: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    first = await _read_all(reader, 2)
    assert first.startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    rest = await _read_all(reader, 4)  # EOF when the 1 s keep-alive ends
    assert rest == b"" and time.monotonic() - t0 < 3
    writer.close()


def test_the_tokenport_gateway_command_uses_these_protections() -> None:
    src = (Path(__file__).resolve().parents[2] / "serving" / "cli" / "run.py").read_text()
    assert "uvicorn_options(" in src


def test_every_integer_parameter_of_the_api_is_bounded(srv: Server) -> None:
    """An unbounded integer (e.g. ?after=10**30) overflows the database driver (SQLite: 64-bit) -> 500."""
    doc = srv.app.openapi()
    unbounded = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for p in op.get("parameters", []):
                s = p.get("schema", {})
                types = [s, *s.get("anyOf", [])]
                if any(
                    t.get("type") == "integer" and "maximum" not in t and "exclusiveMaximum" not in t
                    for t in types
                ):
                    unbounded.append(f"{method.upper()} {path} ?{p['name']}")
    assert not unbounded, "integer parameters without a maximum: " + ", ".join(unbounded)
