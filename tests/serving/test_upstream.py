"""The worker HTTP client (serving/proxy/upstream.py) against real local servers: an aiohttp app for
the ordinary answers and raw asyncio servers for the edge cases (stale keep-alive, resets,
Connection: close, HTTP/1.0, bodies delimited by EOF, stray bytes, backpressure)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from serving.proxy import upstream
from serving.proxy.upstream import HIGH_WATER, UpstreamClient, UpstreamError, UpstreamResponse
from tests.fakes import free_port

EVENTS = [b'data: {"i": %d, "choices": [{"delta": {"content": "tok"}}]}\n\n' % i for i in range(21)]
EVENTS.append(b"data: [DONE]\n\n")


# --- servers -----------------------------------------------------------------------------------
@dataclass
class AioWorker:
    url: str
    peers: list[Any] = field(default_factory=list)  # client address of each request: one per connection
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def worker() -> AsyncIterator[AioWorker]:
    w = AioWorker(url="")

    async def echo(request: web.Request) -> web.Response:
        w.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        body = await request.read()
        return web.json_response(
            {
                "len": len(body),
                "body": orjson.loads(body) if body else None,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "path": request.path_qs,
                "method": request.method,
            }
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        w.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for event in EVENTS:
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(1000):
                await resp.write(EVENTS[0])
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            w.disconnected.set()
            raise
        return resp

    app = web.Application()
    app.add_routes(
        [
            web.post("/v1/echo", echo),
            web.get("/v1/echo", echo),
            web.post("/v1/stream", stream),
            web.post("/v1/endless", endless),
        ]
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    w.url = f"http://127.0.0.1:{port}"
    try:
        yield w
    finally:
        await runner.cleanup()


@dataclass
class Raw:
    url: str = ""
    conns: int = 0  # connections accepted
    ended: int = 0  # connections whose handler has finished (the client closed, or the server hung up)
    requests: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Raw, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(handle: Handler) -> AsyncIterator[Raw]:
    raw = Raw()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw.conns += 1
        raw.writers.append(writer)
        try:
            await handle(reader, writer, raw, raw.conns)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            raw.ended += 1
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield raw
    finally:
        server.close()
        for w in raw.writers:
            w.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader, raw: Raw) -> bool:
    """Read one request (head and Content-Length body); False at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    raw.requests.append(head + await reader.readexactly(length))
    return True


def answer(body: bytes = b'{"ok": true}', extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"HTTP/%s 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        version,
        len(body),
        extra,
        body,
    )


async def serve_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
    while await read_request(reader, raw):
        writer.write(answer())


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    try:
        yield c
    finally:
        await c.close()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


# --- ordinary answers ------------------------------------------------------------------------------
async def test_post_json_with_content_length(worker: AioWorker, client: UpstreamClient) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 1000}]})
    resp = await client.post(worker.url, "/v1/echo", body, [("X-Request-Id", "req_1")])
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert int(resp.headers["content-length"]) > 0
    got = orjson.loads(await resp.read())
    assert got["len"] == len(body) and got["body"]["model"] == "m"
    assert got["headers"]["content-type"] == "application/json"
    assert got["headers"]["x-request-id"] == "req_1"
    assert got["headers"]["host"] == worker.url.removeprefix("http://")
    assert got["method"] == "POST" and got["path"] == "/v1/echo"
    assert await resp.read() == b""  # already at the end
    assert client.idle_count(worker.url) == 1


async def test_get_and_base_url_with_path(worker: AioWorker, client: UpstreamClient) -> None:
    resp = await client.get(worker.url + "/v1/", "echo?x=1")
    assert resp.status == 200
    got = orjson.loads(await resp.read())
    assert got["method"] == "GET" and got["path"] == "/v1/echo?x=1" and got["len"] == 0


async def test_chunked_sse_read_some_until_end(worker: AioWorker, client: UpstreamClient) -> None:
    resp = await client.post(worker.url, "/v1/stream", b"{}")
    assert resp.status == 200 and resp.headers["transfer-encoding"] == "chunked"
    parts = []
    while chunk := await resp.read_some():
        parts.append(chunk)
    assert b"".join(parts) == b"".join(EVENTS)  # de-chunked
    assert await resp.read_some() == b""
    assert client.idle_count(worker.url) == 1  # released at the end of the body
    resp2 = await client.post(worker.url, "/v1/stream", b"{}")
    assert await resp2.read() == b"".join(EVENTS)
    assert len(set(worker.peers)) == 1


async def test_keep_alive_reuses_one_connection(worker: AioWorker, client: UpstreamClient) -> None:
    for i in range(5):
        resp = await client.post(worker.url, "/v1/echo", b'{"i": %d}' % i)
        assert orjson.loads(await resp.read())["body"] == {"i": i}
    assert len(worker.peers) == 5 and len(set(worker.peers)) == 1


async def test_concurrent_requests_use_separate_connections_and_pool_them(
    worker: AioWorker, client: UpstreamClient
) -> None:
    async def one(i: int) -> Any:
        resp = await client.post(worker.url, "/v1/echo", b'{"i": %d}' % i)
        return orjson.loads(await resp.read())["body"]["i"]

    assert await asyncio.gather(*(one(i) for i in range(8))) == list(range(8))
    assert client.idle_count(worker.url) == len(set(worker.peers))
    await asyncio.gather(*(one(i) for i in range(8)))
    assert len(set(worker.peers)) <= 8


# --- keep-alive edge cases -----------------------------------------------------------------------
async def test_idle_connection_closed_by_worker_is_not_reused() -> None:
    async def close_when_idle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int
    ) -> None:
        await read_request(reader, raw)
        writer.write(answer())
        await writer.drain()
        await asyncio.sleep(0.02)  # like uvicorn's keep-alive timeout

    async with raw_server(close_when_idle) as raw:
        client = UpstreamClient()
        assert (await (await client.post(raw.url, "/a", b"{}")).read()) == b'{"ok": true}'
        await settle()
        assert client.idle_count(raw.url) == 0
        assert (await (await client.post(raw.url, "/a", b"{}")).read()) == b'{"ok": true}'
        assert raw.conns == 2
        await client.close()


async def test_stale_reused_connection_is_retried_once_on_a_fresh_one() -> None:
    async def drop_second(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int
    ) -> None:
        await read_request(reader, raw)
        writer.write(answer())
        if await read_request(reader, raw) and n == 1:
            reset(writer)  # the reused connection: hang up without a byte, as in the keep-alive race

    async with raw_server(drop_second) as raw:
        client = UpstreamClient()
        await (await client.post(raw.url, "/a", b"{}")).read()
        assert client.idle_count(raw.url) == 1
        resp = await client.post(raw.url, "/a", b'{"again": 1}')
        assert resp.status == 200 and await resp.read() == b'{"ok": true}'
        assert raw.conns == 2 and raw.requests[-1].endswith(b'{"again": 1}')
        await client.close()


async def test_reused_connection_failing_during_the_work_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reset that comes long after the write (a load balancer cutting a slow generation) is not the
    idle-close race: re-sending would run the generation twice unseen, so the caller gets the error."""
    monkeypatch.setattr(upstream, "STALE_RETRY_S", 0.05)

    async def slow_then_reset(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int
    ) -> None:
        await read_request(reader, raw)
        writer.write(answer())
        if await read_request(reader, raw):
            await asyncio.sleep(0.2)  # "generating"
            reset(writer)

    async with raw_server(slow_then_reset) as raw:
        client = UpstreamClient()
        await (await client.post(raw.url, "/a", b"{}")).read()
        with pytest.raises(UpstreamError):
            await client.post(raw.url, "/a", b"{}")
        assert raw.conns == 1 and len(raw.requests) == 2  # sent once, not re-sent on a fresh connection
        await client.close()


async def test_https_worker_with_a_private_ca(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    argv = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-keyout",
        str(key),
        "-out",
        str(cert),
    ]
    subprocess.run(argv, check=True, capture_output=True)  # noqa: ASYNC221 - a one-off test certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            await reader.readexactly(2)
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"tls": 1}\n')
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        untrusting = UpstreamClient()  # the system's CAs do not know this certificate
        with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.post(f"https://localhost:{port}", "/v1/chat/completions", b"{}")
        await untrusting.close()
        client = UpstreamClient(ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(2):
            resp = await client.post(f"https://localhost:{port}", "/v1/chat/completions", b"{}")
            assert resp.status == 200 and await resp.read() == b'{"tls": 1}\n'
        assert client.idle_count(f"https://localhost:{port}") == 1  # kept alive over TLS too
        await client.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_fresh_connection_closed_without_answer_is_an_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        await read_request(reader, raw)

    async with raw_server(hang_up) as raw:
        client = UpstreamClient()
        with pytest.raises(UpstreamError, match="before the response was complete"):
            await client.post(raw.url, "/a", b"{}")
        assert raw.conns == 1  # a fresh connection is not retried
        await client.close()


async def test_answer_started_then_reset_is_not_retried() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        await read_request(reader, raw)
        writer.write(answer())
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await asyncio.sleep(0.02)
        reset(writer)

    async with raw_server(half) as raw:
        client = UpstreamClient()
        await (await client.post(raw.url, "/a", b"{}")).read()
        with pytest.raises(UpstreamError):
            await client.post(raw.url, "/a", b"{}")
        assert raw.conns == 1
        await client.close()


@pytest.mark.parametrize("extra, version", [(b"Connection: close\r\n", b"1.1"), (b"", b"1.0")])
async def test_connection_close_and_http10_are_honoured(extra: bytes, version: bytes) -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        while await read_request(reader, raw):  # keeps the socket open: the client must close it
            writer.write(answer(extra=extra, version=version))

    async with raw_server(once) as raw:
        client = UpstreamClient()
        for _ in range(2):
            assert await (await client.post(raw.url, "/a", b"{}")).read() == b'{"ok": true}'
            assert client.idle_count(raw.url) == 0
        await settle()
        assert raw.conns == 2 and raw.ended == 2
        await client.close()


async def test_http10_keep_alive_is_reused() -> None:
    async with raw_server(
        lambda r, w, raw, n: _serve_with(
            r, w, raw, answer(extra=b"Connection: keep-alive\r\n", version=b"1.0")
        )
    ) as raw:
        client = UpstreamClient()
        for _ in range(2):
            await (await client.post(raw.url, "/a", b"{}")).read()
        assert raw.conns == 1
        await client.close()


async def _serve_with(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, data: bytes
) -> None:
    while await read_request(reader, raw):
        writer.write(data)


async def test_idle_timeout_expires_pooled_connections() -> None:
    async with raw_server(serve_forever) as raw:
        client = UpstreamClient(idle_timeout_s=0.05)
        await (await client.post(raw.url, "/a", b"{}")).read()
        await asyncio.sleep(0.1)
        await (await client.post(raw.url, "/a", b"{}")).read()
        assert raw.conns == 2
        await settle()
        assert raw.ended == 1  # the expired one was closed, not just forgotten
        await client.close()


async def test_max_idle_per_host_bounds_the_pool() -> None:
    async with raw_server(serve_forever) as raw:
        client = UpstreamClient(max_idle_per_host=2)
        resps = await asyncio.gather(*(client.post(raw.url, "/a", b"{}") for _ in range(4)))
        for r in resps:
            await r.read()
        assert raw.conns == 4 and client.idle_count(raw.url) == 2
        await settle()
        assert raw.ended == 2
        await client.close()


async def test_stray_bytes_on_an_idle_connection_drop_it() -> None:
    async def stray(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        while await read_request(reader, raw):
            writer.write(answer())
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"garbage")

    async with raw_server(stray) as raw:
        client = UpstreamClient()
        await (await client.post(raw.url, "/a", b"{}")).read()
        await settle()
        assert client.idle_count(raw.url) == 0
        await (await client.post(raw.url, "/a", b"{}")).read()
        assert raw.conns == 2
        await client.close()


async def test_bytes_after_the_answer_in_the_same_packet_drop_the_connection() -> None:
    async with raw_server(lambda r, w, raw, n: _serve_with(r, w, raw, answer() + answer())) as raw:
        client = UpstreamClient()
        assert await (await client.post(raw.url, "/a", b"{}")).read() == b'{"ok": true}'
        assert client.idle_count(raw.url) == 0
        await client.close()


# --- bodies and failures ---------------------------------------------------------------------------
async def test_body_delimited_by_eof() -> None:
    async def until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"world")
        await writer.drain()

    async with raw_server(until_eof) as raw:
        client = UpstreamClient()
        resp = await client.post(raw.url, "/a", b"{}")
        assert await resp.read() == b"hello world"
        assert client.idle_count(raw.url) == 0
        await client.close()


async def test_reset_mid_body_raises_with_what_arrived() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        await asyncio.sleep(0.02)
        reset(writer)

    async with raw_server(cut) as raw:
        client = UpstreamClient()
        resp = await client.post(raw.url, "/a", b"{}")
        with pytest.raises(UpstreamError, match="before the response was complete") as info:
            await resp.read()
        assert info.value.partial == b"x" * 100
        with pytest.raises(UpstreamError):
            await resp.read_some()  # stays failed
        resp = await client.post(raw.url, "/a", b"{}")  # read_some: the bytes first, then the error
        assert await resp.read_some() == b"x" * 100
        with pytest.raises(UpstreamError):
            await resp.read_some()
        assert raw.conns == 2 and client.idle_count(raw.url) == 0
        await client.close()


async def test_chunked_stream_cut_mid_way_is_an_error() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    async with raw_server(cut) as raw:
        client = UpstreamClient()
        resp = await client.post(raw.url, "/a", b"{}")
        assert await resp.read_some() == b"hello"
        with pytest.raises(UpstreamError):
            await resp.read_some()
        await client.close()


async def test_malformed_answer_is_an_error() -> None:
    async with raw_server(lambda r, w, raw, n: _serve_with(r, w, raw, b"NOT HTTP AT ALL\r\n\r\n")) as raw:
        client = UpstreamClient()
        with pytest.raises(UpstreamError, match="Malformed"):
            await client.post(raw.url, "/a", b"{}")
        await client.close()


async def test_connection_refused_is_an_error(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamError, match="Cannot connect"):
        await client.post(f"http://127.0.0.1:{free_port()}", "/a", b"{}")


async def test_connect_timeout_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(10)

    monkeypatch.setattr(loop, "create_connection", never)
    client = UpstreamClient(connect_timeout_s=0.05)
    with pytest.raises(UpstreamError, match="timed out"):
        await client.post("http://127.0.0.1:9", "/a", b"{}")


async def test_bad_urls_and_headers_are_refused(client: UpstreamClient) -> None:
    with pytest.raises(ValueError, match="http and https"):
        await client.post("ftp://example.com", "/a", b"{}")
    with pytest.raises(ValueError, match="header"):
        await client.post("http://127.0.0.1:9", "/a", b"{}", [("X-Evil", "a\r\nInjected: 1")])
    with pytest.raises(ValueError, match="path"):
        await client.post("http://127.0.0.1:9", "/a b", b"{}")


# --- cancellation, backpressure, close --------------------------------------------------------------
async def test_cancelled_mid_read_closes_the_connection(worker: AioWorker, client: UpstreamClient) -> None:
    resp = await client.post(worker.url, "/v1/endless", b"{}")
    assert (await resp.read_some()).startswith(b"data:")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            while await resp.read_some():
                pass
    await asyncio.wait_for(worker.disconnected.wait(), 2)  # the worker saw the client go
    assert client.idle_count(worker.url) == 0
    assert await resp.read_some() == b""


async def test_cancelled_before_the_headers_closes_the_connection() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        while await read_request(reader, raw):
            await asyncio.sleep(0.2)
            writer.write(answer())

    async with raw_server(slow) as raw:
        client = UpstreamClient()
        await (await client.post(raw.url, "/a", b"{}")).read()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.post(raw.url, "/a", b"{}")
        await asyncio.sleep(0.3)
        assert client.idle_count(raw.url) == 0 and raw.ended == 1
        await (await client.post(raw.url, "/a", b"{}")).read()
        assert raw.conns == 2
        await client.close()


async def test_close_drops_a_stream(worker: AioWorker, client: UpstreamClient) -> None:
    resp = await client.post(worker.url, "/v1/endless", b"{}")
    await resp.read_some()
    resp.close()
    await asyncio.wait_for(worker.disconnected.wait(), 2)
    assert client.idle_count(worker.url) == 0


async def test_release_before_the_end_closes_and_after_the_end_pools(
    worker: AioWorker, client: UpstreamClient
) -> None:
    resp = await client.post(worker.url, "/v1/endless", b"{}")
    await resp.read_some()
    resp.release()
    await asyncio.wait_for(worker.disconnected.wait(), 2)
    assert client.idle_count(worker.url) == 0
    resp = await client.post(worker.url, "/v1/echo", b"{}")
    await asyncio.sleep(0.02)  # the whole answer has arrived, unread
    resp.release()
    resp.release()
    resp.close()  # after release: a no-op, the pooled connection stays
    assert client.idle_count(worker.url) == 1


async def test_backpressure_pauses_reading() -> None:
    size = 16 * 1024 * 1024
    blob = b"x" * size

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw, n: int) -> None:
        while await read_request(reader, raw):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(blob)
            await writer.drain()

    async with raw_server(big) as raw:
        client = UpstreamClient()
        resp = await client.post(raw.url, "/a", b"{}")
        await asyncio.sleep(0.2)
        conn = resp._conn
        assert conn is not None and conn.paused
        assert conn.buffered < 4 * HIGH_WATER  # far from the 16 MiB on offer
        assert raw.writers[0].transport.get_write_buffer_size() > 0  # the worker is held back
        got = 0
        while chunk := await resp.read_some():
            assert len(chunk) < 4 * HIGH_WATER
            got += len(chunk)
        assert got == size
        assert client.idle_count(raw.url) == 1
        resp2 = await client.post(raw.url, "/a", b"{}")
        assert len(await resp2.read()) == size
        assert raw.conns == 1
        await client.close()


async def test_client_close_closes_pooled_connections() -> None:
    async with raw_server(serve_forever) as raw:
        client = UpstreamClient()
        resps: list[UpstreamResponse] = await asyncio.gather(
            *(client.post(raw.url, "/a", b"{}") for _ in range(3))
        )
        for r in resps:
            await r.read()
        assert client.idle_count(raw.url) == 3
        await client.close()
        await settle()
        assert raw.ended == 3 and client.idle_count(raw.url) == 0
        with pytest.raises(RuntimeError):
            await client.post(raw.url, "/a", b"{}")


def test_works_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with raw_server(serve_forever) as raw:
            client = UpstreamClient()
            for _ in range(3):
                assert await (await client.post(raw.url, "/a", b"{}")).read() == b'{"ok": true}'
            assert raw.conns == 1
            await client.close()
        await test_backpressure_pauses_reading()
        await test_reset_mid_body_raises_with_what_arrived()
        await test_stale_reused_connection_is_retried_once_on_a_fresh_one()
        await test_body_delimited_by_eof()
        await test_tcp_nodelay_is_set()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_tcp_nodelay_is_set() -> None:
    async with raw_server(serve_forever) as raw:
        client = UpstreamClient()
        resp = await client.post(raw.url, "/a", b"{}")
        conn = resp._conn
        assert conn is not None and conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await resp.read()
        await client.close()


async def test_finish_pools_the_connection_when_the_terminator_arrives_later() -> None:
    """A stream read up to its last event, whose chunked terminator comes after a pause, goes back
    to the pool (not closed) once finish() was called: the next request reuses it."""
    connections = 0
    proceed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
            )
            await reader.readexactly(length)
            event = b"data: [DONE]\n\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % len(event)
                + event
                + b"\r\n"
            )
            await writer.drain()
            await proceed.wait()
            proceed.clear()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = UpstreamClient()
    try:
        resp = await client.post(f"http://127.0.0.1:{port}", "/v1/chat/completions", b"{}")
        assert await resp.read_some() == b"data: [DONE]\n\n"
        resp.finish()
        assert client.idle_count(f"http://127.0.0.1:{port}") == 0  # not complete yet
        proceed.set()
        for _ in range(100):
            if client.idle_count(f"http://127.0.0.1:{port}"):
                break
            await asyncio.sleep(0.01)
        assert client.idle_count(f"http://127.0.0.1:{port}") == 1
        resp2 = await client.post(f"http://127.0.0.1:{port}", "/v1/chat/completions", b"{}")
        assert await resp2.read_some() == b"data: [DONE]\n\n"
        proceed.set()
        assert await resp2.read_some() == b""
        assert connections == 1
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
