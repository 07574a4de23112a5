"""SSE relay: passes a worker's stream to the client chunk by chunk and captures usage on the way.

The worker is always asked for usage on every chunk (continuous_usage_stats), so the meter holds the
exact cumulative count at any moment. The client sees usage only as it asked:
- `include_usage` and `continuous_usage_stats`: every chunk unchanged;
- `include_usage` only: usage removed from content chunks, the final usage chunk kept;
- neither: usage removed and the final usage-only chunk dropped.
The event is committed before `data: [DONE]` is sent. A client that goes away is metered for what
was generated up to that point (`client_cancelled`) and the worker's request is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from metering.events import Outcome
from metering.ledger import LedgerUnavailable
from metering.metrics import Metrics
from metering.recorder import Recorder, RequestMeter
from metering.tokencount import TokenCounter
from serving.errors import ServiceUnavailable, UpstreamError
from serving.proxy.flight import Flight
from serving.proxy.textsize import count_choices
from serving.proxy.upstream import UpstreamError as UpstreamReadError
from serving.proxy.upstream import UpstreamResponse

log = logging.getLogger("tokenport.relay")
DONE = b"data: [DONE]\n\n"


class StreamRelay:
    def __init__(
        self,
        meter: RequestMeter,
        resp: UpstreamResponse,
        recorder: Recorder,
        metrics: Metrics,
        *,
        want_usage: bool,
        want_continuous: bool,
        t0: float,
        flight: Flight | None = None,
        head: bytes = b"",
        tokens: TokenCounter | None = None,
        body: dict[str, Any] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.meter = meter
        self.resp = resp
        self.recorder = recorder
        self.metrics = metrics
        self.want_usage = want_usage
        self.want_continuous = want_continuous
        self.t0 = t0
        self.overhead = 0.0
        self.content_chunks = 0
        self.token_chunks = 0  # chunks that carry a generated token (not chat's role-only first chunk)
        self._first = True
        self._flight = flight  # the worker's in-flight counts and latency: closed when the stream ends
        self._head = head  # bytes read before the response started (up to the first event)
        self._read = resp.read_some
        self._deadline = deadline  # the request's own (loop time), for the whole stream
        self._tokens = tokens
        self._request = body
        self._texts: dict[int, list[str]] = {}  # generated text per choice, kept only while no usage came
        self._finish: dict[int, str | None] = {}

    def _capture(self, choices: list[Any]) -> None:
        """Count and keep generated text (for the estimate, should the worker never send usage)."""
        for c in choices:
            if not isinstance(c, dict):
                continue
            delta = c.get("delta")
            text = (
                c.get("text")
                if delta is None
                else (delta.get("content") if isinstance(delta, dict) else None)
            )
            role_only = (
                isinstance(delta, dict) and "role" in delta and not text and c.get("finish_reason") is None
            )
            if not role_only:
                self.token_chunks += 1
            if self.meter.has_usage:
                continue
            i = int(c.get("index") or 0)
            if text:
                self._texts.setdefault(i, []).append(str(text))
            if c.get("finish_reason") is not None:
                self._finish[i] = c["finish_reason"]

    def _transform(self, obj: dict[str, Any], payload: bytes) -> bytes | None:
        if self.want_continuous and self.want_usage:
            return payload
        if "usage" not in obj:
            return payload
        if not obj.get("choices"):
            return payload if self.want_usage else None
        # vLLM writes compact JSON with `usage` as the last field: cut it from the bytes (a quote
        # inside a string is escaped, so `,"usage":` unescaped can only be that key); else re-encode.
        if next(reversed(obj)) == "usage":
            cut = payload.rfind(b',"usage":')
            if cut != -1 and payload.endswith(b"}"):
                return payload[:cut] + b"}"
        del obj["usage"]
        return orjson.dumps(obj)

    def _events(self, lines: list[bytes], out: list[bytes]) -> tuple[Outcome, bytes] | None:
        """Relay complete lines into `out`; (outcome, last bytes) when the stream ends among them."""
        meter = self.meter
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return Outcome.OK, DONE
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if "error" in obj:  # the worker's own error event: told in our words, not vLLM's
                failed = UpstreamError("The worker failed while generating this answer.")
                return Outcome.UPSTREAM_ERROR, failed.sse_event()
            usage = obj.get("usage")
            if usage:
                meter.take_usage(usage)
            if obj.get("choices"):
                self.content_chunks += 1
                if not meter.has_usage:  # the worker's usage is exact: no text to keep for an estimate
                    self._capture(obj["choices"])
                if self._first:
                    self._first = False
                    self.metrics.child(self.metrics.ttft, self.metrics.model_label(meter.model)).observe(
                        time.perf_counter() - self.t0
                    )
            relayed = self._transform(obj, payload)
            if relayed is not None:
                out.append(b"data: " + relayed + b"\n\n")
                count_choices(meter, obj.get("choices"))  # the text relayed, from the chunk parsed above
        return None

    async def body(self) -> AsyncIterator[bytes]:
        """One client write per upstream read: every complete event the read delivered, relayed
        together (a stream under load delivers several per read; `[DONE]` only after the commit)."""
        buf, self._head = self._head, b""
        try:
            while True:
                if buf:
                    t = time.perf_counter()
                    *lines, buf = buf.split(b"\n")
                    out: list[bytes] = []
                    end = self._events(lines, out)
                    self.overhead += time.perf_counter() - t
                    if end is not None:
                        outcome, last = end
                        if outcome is Outcome.OK:
                            self.resp.finish()  # pooled once the chunked terminator arrives
                        refused = await self._end(outcome)
                        out.append(refused or last)  # no [DONE] unless the event is committed
                        yield b"".join(out)
                        return
                    if out:
                        yield out[0] if len(out) == 1 else b"".join(out)
                async with asyncio.timeout_at(self._deadline):
                    data = await self._read()
                if not data:
                    if not buf:
                        break
                    data = b"\n"  # the worker closed right after a last line without its newline
                buf += data
            # The worker closed the stream without [DONE]: it failed mid-stream.
            self._worker_failed()
            await self._end(Outcome.UPSTREAM_ERROR)
            yield UpstreamError("The worker ended the stream unexpectedly.").sse_event()
        except (TimeoutError, UpstreamReadError) as exc:
            if isinstance(exc, UpstreamReadError):  # the connection broke (a timeout is the request's own)
                self._worker_failed()
            await self._end(Outcome.UPSTREAM_ERROR)
            yield UpstreamError("The worker failed while streaming.").sse_event()
        finally:
            self.resp.release()

    def _worker_failed(self) -> None:
        if self._flight is not None:
            self._flight.failed()

    def _estimate(self) -> None:
        """The worker sent no usage at all: count the tokens ourselves and say it is an estimate."""
        meter = self.meter
        if meter.has_usage:
            return
        texts = {i: "".join(parts) for i, parts in self._texts.items()}
        if self._tokens is not None:
            meter.completion_tokens = self._tokens.completion_tokens(
                meter.model, texts, self._finish, self.token_chunks
            )
            if self._request is not None:
                meter.prompt_tokens = self._tokens.prompt_tokens(meter.model, meter.endpoint, self._request)
        else:
            meter.completion_tokens = self.token_chunks
        meter.estimated = True

    async def _end(self, outcome: Outcome) -> bytes | None:
        """Commit the event; an SSE error event instead of the ending when the ledger refused it."""
        self._estimate()
        if self._flight is not None:
            self._flight.streamed(self.overhead)
        try:
            await self.recorder.record(self.meter, outcome)
        except LedgerUnavailable:
            return ServiceUnavailable(
                "The usage ledger is unavailable, so this answer cannot be completed; retry shortly.",
                code="ledger_unavailable",
            ).sse_event()
        except Exception:  # the database is down and the spool cannot be written either (disk full)
            log.exception("usage of %s could not be recorded", self.meter.request_id)
            return ServiceUnavailable(
                "The usage of this answer could not be recorded, so it cannot be completed; retry shortly.",
                code="ledger_unavailable",
            ).sse_event()
        return None

    def abandon(self) -> None:
        """Called when the response ends for any reason; meters a client that went away."""
        if self.meter.recorded:
            return
        self.resp.close()  # drops the worker connection: vLLM aborts the generation
        self._estimate()
        if self._flight is not None:
            self._flight.streamed(self.overhead)
        self.recorder.record_nowait(self.meter, Outcome.CLIENT_CANCELLED)


class RelayResponse(StreamingResponse):
    """The relay as a plain ASGI response: one `send` per relayed write, and a client that goes away
    (`http.disconnect`) cancels the relay at once, so the worker's generation is aborted and what it
    produced is metered `client_cancelled` (StreamRelay.abandon). A StreamingResponse subclass so that
    content logging can tee `body_iterator`; Starlette's own __call__ (a task group per response and
    cancel-scope checks on every chunk) is not used."""

    def __init__(self, relay: StreamRelay, headers: dict[str, str]) -> None:
        super().__init__(relay.body(), media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        state = {"done": False, "left": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        def on_disconnect(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and not state["done"] and task is not None:
                state["left"] = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        watcher.add_done_callback(on_disconnect)
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state["done"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["left"]:
                raise
            task.uncancel()  # type: ignore[union-attr]  # the client left: this response is over, not cancelled
        except OSError:  # the server's transport broke mid-write: the client is gone
            pass
        finally:
            state["done"] = True
            watcher.cancel()
            self.relay.abandon()
