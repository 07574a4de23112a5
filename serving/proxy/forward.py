"""Forwarding one OpenAI request to a worker and metering it, streamed or not.

Every request ends in exactly one usage event under its request id: `ok`, `client_cancelled`,
`upstream_error` (tokens the worker did produce are kept; a request cut by its timeout before the
first byte is billed its prompt, estimated), or `rejected` (the worker refused it with a 4xx: zero
tokens; the client gets our own message, never the worker's text, see `rejected`). A connection failure
before any byte reached the client (while connecting,
while reading a non-streamed body, or before a stream's first event), or a 502/503 answer (a
router's or a worker's "overloaded / going away": nothing was generated for the client), is retried
once on another healthy worker; only the attempt that answered is metered. A worker answer without
usage is counted with the model's tokenizer (metering/tokencount.py) and marked `estimated`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from starlette.responses import Response

from metering.events import Outcome, base_endpoint
from metering.metrics import Metrics
from metering.recorder import Recorder, RequestMeter
from metering.tokencount import TokenCounter
from serving.errors import TokenportError, UpstreamError, UpstreamRejected
from serving.openai.routes import BY_ENDPOINT
from serving.proxy.flight import Flight
from serving.proxy.pool import Worker, WorkerPool
from serving.proxy.relay import RelayResponse, StreamRelay
from serving.proxy.responses_relay import ResponsesRelay, output_texts, usage_of
from serving.proxy.routing import affinity_key
from serving.proxy.textsize import count_choices
from serving.proxy.upstream import UpstreamClient, UpstreamResponse
from serving.proxy.upstream import UpstreamError as UpstreamConnectionError

JSON = "application/json"
MAX_ATTEMPTS = 2
# Retried before the first byte: the worker (or the router before it) refused the request, nothing was
# generated. Not 504: a router's timeout often means the engine is still generating it.
RETRY_STATUSES = frozenset((502, 503))


class Forwarder:
    def __init__(
        self,
        pool: WorkerPool,
        recorder: Recorder,
        metrics: Metrics,
        *,
        timeout_s: float,
        tokens: TokenCounter | None = None,
        session_header: str | None = None,
    ) -> None:
        self.pool = pool
        # gateway.session_header (lower case): the request's session id; passed on to the worker too
        # (a production-stack router's session routing reads it)
        self.session_header = session_header.lower() if session_header else None
        self.tokens = tokens
        self.recorder = recorder
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.client = UpstreamClient()  # the request path's keep-alive client (serving/proxy/upstream.py)
        self.session: aiohttp.ClientSession | None = None  # health checks and reconciliation scrapes

    async def start(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )
        return self.session

    async def close(self) -> None:
        await self.client.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _open(
        self,
        meter: RequestMeter,
        path: str,
        body: bytes,
        deadline: float,
        request: dict[str, Any],
        session: str | None = None,
    ) -> tuple[Worker, UpstreamResponse, bytes]:
        """POST to a healthy worker and read until the client's first byte is known: the whole body
        (non-streamed, or an error status), or a stream's first event. A connection failure before
        that, or a 502/503, is retried once on another healthy worker; the deadline is the
        request's own."""
        tried: list[Worker] = []
        last: Exception | None = None
        headers: tuple[tuple[str, str], ...] = (("X-Request-Id", meter.request_id),)
        if session and self.session_header:
            headers += ((self.session_header, session),)
        key = affinity_key(request, session) if self.pool.routing == "prefix_affinity" else None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                worker = self.pool.pick(meter.model, exclude=tried, key=key)
            except TokenportError:
                if not tried:
                    raise
                break
            tried.append(worker)
            worker.inflight += 1
            resp: UpstreamResponse | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    resp = await self.client.post(worker.url, path, body, headers)
                    got = (
                        await _first_event(resp) if meter.stream and resp.status == 200 else await resp.read()
                    )
                if resp.status >= 500:  # counts towards ejecting the worker
                    self.pool.note_failure(worker)
                    if (
                        resp.status in RETRY_STATUSES
                        and attempt < MAX_ATTEMPTS
                        and self.pool.has_other(meter.model, tried)
                    ):
                        worker.inflight -= 1
                        resp.close()
                        last = UpstreamConnectionError(f"HTTP {resp.status} from {worker.id}")
                        continue
                else:
                    self.pool.note_success(worker)
                meter.worker_id, meter.serving_region = worker.id, worker.region
                return worker, resp, got
            except UpstreamConnectionError as exc:
                worker.inflight -= 1
                if resp is not None:
                    resp.close()
                self.pool.mark_failed(worker)
                last = exc
            except TimeoutError as exc:  # the request's own deadline: not retried
                worker.inflight -= 1
                if resp is not None:
                    resp.close()  # the worker aborts the generation
                meter.worker_id, meter.serving_region = worker.id, worker.region
                self._bill_prompt(meter, request)
                await self.recorder.record(meter, Outcome.UPSTREAM_ERROR)
                raise UpstreamError(
                    "The worker did not answer within the request timeout.", code="upstream_timeout"
                ) from exc
            except BaseException as exc:
                worker.inflight -= 1
                if resp is not None:
                    resp.close()  # the worker aborts the generation
                if isinstance(exc, asyncio.CancelledError):  # cut off (the server's shutdown deadline)
                    meter.worker_id, meter.serving_region = worker.id, worker.region
                    self._bill_prompt(meter, request)
                    self.recorder.record_nowait(meter, Outcome.CLIENT_CANCELLED)
                raise
        meter.worker_id = tried[-1].id if tried else None
        await self.recorder.record(meter, Outcome.UPSTREAM_ERROR)
        raise UpstreamError(f"Could not reach a worker for '{meter.model}': {type(last).__name__}")

    async def forward(
        self,
        meter: RequestMeter,
        body: dict[str, Any],
        headers: dict[str, str],
        t0: float,
        *,
        timeout_s: float | None = None,
        session: str | None = None,
    ) -> Response:
        """The worker's answer as the client's response (a stream relay for a stream); `timeout_s`: a
        tenant's own request timeout (else `gateway.request_timeout_s`); `session`: the request's
        session id (`gateway.session_header`): its routing key under prefix_affinity, passed on.
        The caller has asked `recorder.ledger.admit()` before its admission (metering.fail_closed: a
        503 before any worker runs anything, and before any rate limit is used)."""
        want_usage = want_continuous = False
        if meter.stream and meter.endpoint != "responses":  # a Responses stream always ends with its usage
            opts = body.get("stream_options") or {}
            want_usage = bool(opts.get("include_usage"))
            want_continuous = bool(opts.get("continuous_usage_stats"))
            body["stream_options"] = {**opts, "include_usage": True, "continuous_usage_stats": True}
        raw = orjson.dumps(body)
        path = BY_ENDPOINT[base_endpoint(meter.endpoint)].path
        model_label = self.metrics.model_label(meter.model)
        inflight = self.metrics.child(self.metrics.inflight, model_label)
        inflight.inc()
        t_up = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            worker, resp, got = await self._open(meter, path, raw, deadline, body, session)
        except BaseException:
            inflight.dec()
            raise
        flight = Flight(worker, self.pool, self.metrics, model_label, path, inflight, t0, t_up)
        if not meter.stream or resp.status != 200:  # the whole answer (not streamed, or an error status)
            flight.land()
            try:
                return await self._finish_json(meter, resp.status, got, headers, body)
            finally:
                flight.answered()
        relay_class = ResponsesRelay if meter.endpoint == "responses" else StreamRelay
        relay = relay_class(
            meter,
            resp,
            self.recorder,
            self.metrics,
            want_usage=want_usage,
            want_continuous=want_continuous,
            t0=t0,
            flight=flight,
            head=got,
            tokens=self.tokens,
            body=body,
            deadline=deadline,
        )
        return RelayResponse(relay, headers)

    async def _finish_json(
        self,
        meter: RequestMeter,
        status: int,
        payload: bytes,
        headers: dict[str, str],
        body: dict[str, Any] | None = None,
    ) -> Response:
        if status == 200:
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                await self.recorder.record(meter, Outcome.UPSTREAM_ERROR)
                raise UpstreamError("The worker sent a response that is not JSON.")
            count_choices(meter, obj.get("choices"))
            usage = usage_of(meter.endpoint, obj.get("usage"))
            if usage is not None:
                meter.take_usage(usage)
            else:
                self._estimate(meter, obj, body)
            await self.recorder.record(meter, Outcome.OK)
            return Response(payload, 200, headers=headers, media_type=JSON)
        if 400 <= status < 500:
            await self.recorder.record(meter, Outcome.REJECTED)
            raise rejected(status, payload)
        await self.recorder.record(meter, Outcome.UPSTREAM_ERROR)
        raise UpstreamError(f"The worker answered with HTTP {status}.")

    def _bill_prompt(self, meter: RequestMeter, request: dict[str, Any]) -> None:
        """Cut off before the first byte (timeout, cancellation): the worker prefilled the prompt, what
        it generated is unknown. The prompt is counted with the model's tokenizer and marked estimated,
        so the event bills the work done and settles the request's hold."""
        tokens = self.tokens or TokenCounter({})
        meter.prompt_tokens = tokens.prompt_tokens(meter.model, meter.endpoint, request)
        meter.estimated = True

    def _estimate(self, meter: RequestMeter, obj: dict[str, Any], body: dict[str, Any] | None) -> None:
        """A 200 answer without usage: count its tokens (never bill it as zero) and mark it estimated."""
        texts: dict[int, str] = {}
        finish: dict[int, str | None] = {}
        for c in obj.get("choices") or []:
            if isinstance(c, dict):
                i = int(c.get("index") or 0)
                msg = c.get("message")
                text = msg.get("content") if isinstance(msg, dict) else c.get("text")
                texts[i] = text if isinstance(text, str) else ""
                finish[i] = c.get("finish_reason")
        if meter.endpoint == "responses":
            texts = output_texts(obj)
        tokens = self.tokens or TokenCounter({})
        meter.completion_tokens = tokens.completion_tokens(meter.model, texts, finish)
        meter.prompt_tokens = tokens.prompt_tokens(meter.model, meter.endpoint, body or {})
        meter.estimated = True


async def _first_event(resp: UpstreamResponse) -> bytes:
    """A stream's bytes up to and including its first `data:` line (all of them if it ends first)."""
    got = b""
    while True:
        data = await resp.read_some()
        if not data:
            return got
        got += data
        i = 0 if got.startswith(b"data:") else got.find(b"\ndata:")
        if i != -1 and got.find(b"\n", i + 1) != -1:
            return got


def rejected(status: int, payload: bytes) -> UpstreamRejected:
    """The worker's 4xx, in OpenAI's shape and our own words: vLLM's text (its internals, versions,
    engine details) never reaches the client; only the kind of refusal is kept (context length, or
    the HTTP status)."""
    text = payload[:4096].decode("utf-8", "replace").lower()
    if "matryoshka" in text:  # vLLM: this embedding model has one fixed size
        refused = UpstreamRejected(
            "This model does not support the 'dimensions' parameter: its embeddings "
            "have one fixed size. Send the request without 'dimensions'.",
            status,
            code="dimensions_not_supported",
        )
        refused.param = "dimensions"
        return refused
    if "context length" in text or "context_length" in text:
        return UpstreamRejected(
            "The prompt and the requested completion (max_tokens) are longer than this "
            "model's context: shorten the prompt or lower max_tokens.",
            status,
            code="context_length_exceeded",
        )
    return UpstreamRejected(
        f"The model refused this request (HTTP {status}): a parameter is not supported "
        "or is out of range for this model.",
        status,
    )
