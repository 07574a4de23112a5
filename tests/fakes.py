"""A fake vLLM OpenAI server (aiohttp, loopback only) for the gateway's unit tests.

It answers like vLLM's OpenAI server started with `--enable-force-include-usage
--enable-prompt-tokens-details`:

- `GET /health` -> 200 (or `Behaviour.health_status`);
- `POST /v1/chat/completions` and `POST /v1/completions`, non-stream: one JSON body whose `usage` has
  prompt_tokens, completion_tokens, total_tokens and prompt_tokens_details.cached_tokens;
- the same streamed: SSE `data: {...}\\n\\n` events. Usage is decided as vLLM's
  `should_include_usage` does: forced on, and cumulative on *every* chunk only when the request asked
  for `stream_options.continuous_usage_stats`. Chat sends a role chunk first, then one chunk per token
  (the last one carries `finish_reason`), then a usage-only chunk (`choices: []`, with
  prompt_tokens_details), then `data: [DONE]`.

Behaviour knobs (`FakeWorker.behave(...)`, reset with `FakeWorker.reset()`): token count, prompt and
cached counts, a delay between chunks, an HTTP status with a body, dying mid-stream after K events,
an in-stream error event after K events, omitting usage, an arbitrary 200 body. Every request is
recorded (`FakeWorker.requests`) with its body and whether the gateway closed the connection before
the stream finished (`aborted`).
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests import fake_surface

BAD_REQUEST_BODY: dict[str, Any] = {
    "error": {"message": "max_tokens too large", "type": "BadRequestError", "param": None, "code": 400}
}


@dataclass
class Behaviour:
    tokens: int = 3
    prompt_tokens: int = 31
    cached_tokens: int = 0
    delay_s: float = 0.0  # between streamed events
    answer_delay_s: float = 0.0  # before a non-streamed answer
    status: int = 200  # anything else is returned with `error_body` instead of a completion
    error_body: Any = field(default_factory=lambda: dict(BAD_REQUEST_BODY))
    die_after: int | None = None  # streamed events sent before the connection is cut (no [DONE])
    omit_usage: bool = False  # never send usage at all
    error_event_after: int | None = None  # streamed events before vLLM's in-stream error event + [DONE]
    body_override: bytes | None = None  # a 200 non-stream answer with exactly these bytes
    health_status: int = 200
    force_include_usage: bool = True  # vLLM --enable-force-include-usage


@dataclass
class ReceivedRequest:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]  # lower-cased names
    started_at: float
    events_sent: int = 0
    finished: bool = False  # the whole answer (with [DONE] for streams) was written
    aborted: bool = False  # the peer closed the connection before the answer was complete
    aborted_at: float | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(n: int) -> int:
    """The first of n consecutive free loopback ports, below the kernel's ephemeral range: a port from
    free_port() + 1 may be any client socket's local port (it was once a Redis connection's)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(10_000, low - n)
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports below {low}")


def _lax_bool(value: Any) -> bool:
    """pydantic's lax bool parsing, which vLLM's request models use."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in {"1", "true", "t", "yes", "y", "on"}:
            return True
        if v in {"0", "false", "f", "no", "n", "off", ""}:
            return False
        raise ValueError(value)
    return bool(value)


class _Aborted(Exception):
    pass


class FakeWorker:
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.requests: list[ReceivedRequest] = []
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> FakeWorker:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", functools.partial(fake_surface.embeddings, self))
        app.router.add_post("/v1/responses", functools.partial(fake_surface.responses, self))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port if port is not None else 0, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = int(sock.getsockname()[1])
        return self

    async def stop(self) -> None:
        """Stop listening (the port then refuses connections) and drop open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- knobs ----------------------------------------------------------------------------
    def behave(self, **knobs: Any) -> None:
        for k, v in knobs.items():
            if not hasattr(self.behaviour, k):
                raise AttributeError(f"unknown fake behaviour {k!r}")
            setattr(self.behaviour, k, v)

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.requests.clear()

    def completion_requests(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.path != "/health"]

    # --- handlers -------------------------------------------------------------------------
    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(status=self.behaviour.health_status)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        b = self.behaviour
        raw = await request.read()
        body: dict[str, Any] = orjson.loads(raw)
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = ReceivedRequest(path=request.path, body=body, headers=headers, started_at=time.monotonic())
        self.requests.append(rec)
        if b.status != 200:
            rec.finished = True
            payload = b.error_body if isinstance(b.error_body, bytes) else orjson.dumps(b.error_body)
            return web.Response(status=b.status, body=payload, content_type="application/json")
        try:
            stream = _lax_bool(body.get("stream", False))
        except ValueError:
            return _bad_request("stream must be a boolean")
        if body.get("stream_options") and not body.get("stream"):
            # vLLM: "Stream options can only be defined when `stream=True`."
            return _bad_request("Stream options can only be defined when `stream=True`.")
        model = str(body.get("model"))
        if not stream:
            if b.answer_delay_s:
                await asyncio.sleep(b.answer_delay_s)
            rec.finished = True
            payload = (
                b.body_override if b.body_override is not None else orjson.dumps(self._whole(model, chat))
            )
            return web.Response(body=payload, content_type="application/json")
        return await self._stream(request, rec, model, chat)

    def _usage(self, completion: int, *, details: bool) -> dict[str, Any]:
        b = self.behaviour
        u: dict[str, Any] = {
            "prompt_tokens": b.prompt_tokens,
            "total_tokens": b.prompt_tokens + completion,
            "completion_tokens": completion,
        }
        if details:
            u["prompt_tokens_details"] = {"cached_tokens": b.cached_tokens}
        return u

    def _whole(self, model: str, chat: bool) -> dict[str, Any]:
        b = self.behaviour
        text = "".join(f" w{i}" for i in range(b.tokens))
        if chat:
            obj: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
            }
        else:
            obj = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                    }
                ],
            }
        if not b.omit_usage:
            obj["usage"] = self._usage(b.tokens, details=True)
        return obj

    async def _stream(
        self, request: web.Request, rec: ReceivedRequest, model: str, chat: bool
    ) -> web.StreamResponse:
        b = self.behaviour
        opts = rec.body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) or b.force_include_usage
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        if b.omit_usage:
            include_usage = continuous = False
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        head: dict[str, Any] = (
            {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
            if chat
            else {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": model}
        )
        events: list[dict[str, Any]] = []
        if chat:
            events.append(
                {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        for i in range(b.tokens):
            last = i == b.tokens - 1
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": f" w{i}"},
                    "logprobs": None,
                    "finish_reason": "stop" if last else None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": f" w{i}",
                    "logprobs": None,
                    "finish_reason": "length" if last else None,
                    "stop_reason": None,
                }
            events.append({**head, "choices": [choice]})
        if continuous:
            produced = 0
            for ev in events:
                if not (chat and ev is events[0]):
                    produced += 1
                ev["usage"] = self._usage(produced, details=False)
        if include_usage:
            events.append({**head, "choices": [], "usage": self._usage(b.tokens, details=True)})
        try:
            for ev in events:
                if b.die_after is not None and rec.events_sent >= b.die_after:
                    # The worker process dies: the connection is cut without the terminating chunk.
                    assert request.transport is not None
                    request.transport.abort()
                    rec.finished = False
                    return resp
                if b.error_event_after is not None and rec.events_sent >= b.error_event_after:
                    # vLLM reports an engine error inside the stream, then ends it normally.
                    err = {
                        "error": {
                            "message": "engine step failed",
                            "type": "InternalServerError",
                            "param": None,
                            "code": 500,
                        }
                    }
                    await self._write(request, resp, rec, b"data: " + orjson.dumps(err) + b"\n\n")
                    break
                if b.delay_s:
                    await asyncio.sleep(b.delay_s)
                await self._write(request, resp, rec, b"data: " + orjson.dumps(ev) + b"\n\n")
            await self._write(request, resp, rec, b"data: [DONE]\n\n", count=False)
            await resp.write_eof()
            rec.finished = True
        except _Aborted:
            pass
        except asyncio.CancelledError:
            self._mark_aborted(rec)
            raise
        return resp

    async def _write(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        rec: ReceivedRequest,
        data: bytes,
        *,
        count: bool = True,
    ) -> None:
        if request.transport is None or request.transport.is_closing():
            self._mark_aborted(rec)
            raise _Aborted
        try:
            await resp.write(data)
        except (ConnectionError, RuntimeError) as exc:  # aiohttp: ClientConnectionResetError
            self._mark_aborted(rec)
            raise _Aborted from exc
        if count:
            rec.events_sent += 1

    @staticmethod
    def _mark_aborted(rec: ReceivedRequest) -> None:
        if not rec.aborted:
            rec.aborted = True
            rec.aborted_at = time.monotonic()


def _bad_request(message: str) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
    return web.Response(status=400, body=orjson.dumps(body), content_type="application/json")
