"""Slow and oversized clients: a header deadline and size cap at the HTTP protocol, a body deadline
and size cap for every route.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but has no deadline for the
request head: a client that connects and sends one header byte every few seconds (slowloris) keeps
its connection, and with enough of them the process runs out of descriptors. GuardedHttpTools
(uvicorn's httptools protocol plus two checks) answers 408 and closes a connection whose request
head is not complete within `gateway.header_timeout_s` of its first byte (or of the connection), and
431 when the head is not complete within `gateway.max_header_bytes` received bytes (counted before
the parser sees them, so a whole oversized head in one write is refused too). BodyGuardMiddleware gives the
body
`gateway.body_timeout_s` in total (408) and enforces `gateway.max_body_bytes` on every route (413),
before FastAPI reads anything.
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import BodyTooLarge, TokenportError, render
from serving.limits.errors import HeadersTooLarge, RequestTimeout


def _raw_error(reason: str, exc: TokenportError) -> bytes:
    """A whole HTTP/1.1 response for `exc`, written straight to the transport (no ASGI app ran)."""
    status, headers, body = render(exc)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"HTTP/1.1 {status} {reason}\r\n{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request head."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 65_536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: TimerHandle | None = None
        self._head_bytes = 0  # bytes received since the last head ended (the next head's, so far)
        self._in_head = False  # between the first byte of a request and the end of its head
        self._in_body = False  # between the end of a head and the end of its message
        self._heads = 0  # heads parsed on this connection

    @classmethod
    def configured(cls, header_timeout_s: float, max_header_bytes: int) -> type[GuardedHttpTools]:
        return type(
            "GuardedHttpToolsConfigured",
            (cls,),
            {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes},
        )

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a whole head is dropped too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._arm()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, counting every byte that may belong to a request head before it is parsed:
        a head that is not complete within `max_header_bytes` received bytes is refused (431), however
        it arrives (one write of 100 KB, or many small ones)."""
        if self._in_body or self.transport.is_closing():
            super().data_received(data)
            return
        room = self.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)  # what follows the head in this chunk is forgotten at its end
            super().data_received(data)
            return
        heads = self._heads
        if room > 0:  # the head must end within the bytes it may still have
            self._head_bytes += room
            super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self._heads != heads:  # the head ended in time: the rest (body, next request) as usual
            self.data_received(data[room:])
        else:
            self._reject(
                "Request Header Fields Too Large",
                HeadersTooLarge(f"The request head is larger than {self.max_header_bytes} bytes."),
            )

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._heads += 1
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_head or self.cycle is None:
            if self._busy():  # a pipelined head while a response is still going: wait for it
                self._arm()
                return
            self._reject(
                "Request Timeout",
                RequestTimeout(f"The request head was not received within {self.header_timeout_s:g} s."),
            )

    def _reject(self, reason: str, exc: TokenportError) -> None:
        self._disarm()
        if not self._busy():
            self.transport.write(_raw_error(reason, exc))
        self.transport.close()


def too_large(max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"Request body is larger than the limit of {max_bytes} bytes.", headers={"connection": "close"}
    )


def too_slow(timeout_s: float) -> RequestTimeout:
    return RequestTimeout(
        f"The request body was not received within {timeout_s:g} s.", headers={"connection": "close"}
    )


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


async def read_body(
    receive: Receive, headers: Mapping[str, str], *, max_bytes: int, timeout_s: float
) -> bytes:
    """The whole body, for an app that reads it itself (serving/pipeline.py), under the rules
    BodyGuardMiddleware applies to the other routes: within `timeout_s` (408) and `max_bytes` (413),
    both closing the connection; a refused body is drained for a moment first (outside the deadline)."""
    declared = headers.get("content-length")
    message: Message = {"type": "http.request", "body": b"", "more_body": True}
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        await drain(receive, message)
        raise too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise ClientGone  # http.disconnect
                part: bytes = message.get("body", b"")
                size += len(part)
                if size > max_bytes or not message.get("more_body", False):
                    break
                chunks.append(part)
    except TimeoutError as exc:
        raise too_slow(timeout_s) from exc
    if size > max_bytes:
        await drain(receive, message)
        raise too_large(max_bytes)
    if not chunks:
        return part
    chunks.append(part)
    return b"".join(chunks)


class BodyGuardMiddleware:
    """A total deadline and a size cap for request bodies, on every route."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        path_max_bytes: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_max_bytes = dict(path_max_bytes or {})  # e.g. the Batch API's file uploads
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.path_max_bytes.get(scope["path"], self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                status, headers, body = render(too_large(max_bytes))
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        done = False
        size = 0
        deadline: float | None = None

        async def guarded() -> Message:
            nonlocal done, size, deadline
            if done:
                return await receive()
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.timeout_s
            try:
                # timeout_at, not wait_for: no extra task per receive() on the hot path
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError as exc:
                done = True
                raise too_slow(self.timeout_s) from exc
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > max_bytes:
                    done = True
                    await drain(receive, message)
                    raise too_large(max_bytes)
                if not message.get("more_body", False):
                    done = True
            else:
                done = True
            return message

        await self.app(scope, guarded, send)


async def drain(receive: Receive, message: Message, *, max_s: float = 1.0, max_bytes: int = 64 << 20) -> None:
    """Read and discard the rest of a refused body for a moment (nginx's lingering close): a
    connection closed while the client is still sending is reset, and the client sees a broken
    connection instead of the 413."""
    size = 0
    try:
        async with asyncio.timeout(max_s):
            while message["type"] == "http.request" and message.get("more_body", False) and size < max_bytes:
                message = await receive()
                size += len(message.get("body", b""))
    except TimeoutError:
        pass


def uvicorn_options(
    header_timeout_s: float, max_header_bytes: int, keep_alive_s: float, max_connections: int | None
) -> dict[str, Any]:
    """uvicorn.Config keyword arguments that apply these protections (used by `tokenport gateway`)."""
    return {
        "http": GuardedHttpTools.configured(header_timeout_s, max_header_bytes),
        "timeout_keep_alive": keep_alive_s,
        "limit_concurrency": max_connections,
    }
