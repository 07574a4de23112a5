"""Run the gateway with experimental patches, to measure what a suggested change would buy.

    python -m bench.variant --patches coalesce,fastpath -- gateway --port P --worker MODEL=URL
    python -m bench.run --patches coalesce,fastpath ...        (the benchmark starts gateways this way)

Nothing here changes the product: each patch monkeypatches one spot in this process only, as a
prototype of a change proposed in bench/results/profile-*.md. Patches:

- sqlite_normal  metering.db.make_engine(sqlite_synchronous="NORMAL") for the gateway (WAL: a commit
                 survives a crash of the gateway process, not a power loss; no fsync per commit)
- langid_off     LanguageDetector.detect returns "en" (upper bound of caching/cheapening detection)
- read_receive   service.read_body reads ASGI `receive` directly (no async generator per request)
- labels_cache   prometheus_client `.labels(...)` memoized per metric and label values
- fastpath       a pure-ASGI front that sends POST /v1/chat/completions and /v1/completions straight
                 to OpenAIService.handle, skipping FastAPI routing/dependencies and Starlette's
                 middleware stack (everything else still goes to the FastAPI app)
- relay_asgi     RelayResponse without Starlette's anyio task group: one asyncio future watches for
                 the client's disconnect and cancels the relay
- coalesce       StreamRelay.body reads whatever the worker has sent (iter_any) and relays all the
                 complete SSE events in it as one write, instead of one write per event
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from typing import Any

PATCHES: dict[str, Any] = {}


def patch(name: str) -> Any:
    def deco(fn: Any) -> Any:
        PATCHES[name] = fn
        return fn
    return deco


@patch("sqlite_normal")
def _sqlite_normal() -> None:
    import serving.app
    from metering import db

    serving.app.make_engine = functools.partial(db.make_engine, sqlite_synchronous="NORMAL")


@patch("raw_ledger")
def _raw_ledger() -> None:
    """UsageStore.append_batch on SQLite through the DBAPI connection with fixed SQL strings
    (same transaction, same rows, same hash chain; no SQLAlchemy statement building per commit)."""
    from metering import store_sql
    from metering.tenants import to_naive, utcnow

    orig = store_sql.UsageStore.append_batch
    cols: list[str] = []

    def dt(v: Any) -> Any:
        return v.strftime("%Y-%m-%d %H:%M:%S.%f") if hasattr(v, "strftime") else v

    def append_batch(self: Any, events: Any) -> list[str]:
        if self._engine.dialect.name != "sqlite":
            return orig(self, events)
        if not events:
            return []
        unique: dict[str, Any] = {}
        for e in events:
            unique.setdefault(e.request_id, e)
        raw = self._engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                ids = list(unique)
                existing = {r[0] for r in cur.execute(
                    f"SELECT request_id FROM usage_events WHERE request_id IN ({','.join('?' * len(ids))})", ids)}
                fresh = [e for rid, e in unique.items() if rid not in existing]
                if not fresh:
                    cur.execute("COMMIT")
                    return []
                row = cur.execute("SELECT hash FROM usage_events ORDER BY seq DESC LIMIT 1").fetchone()
                prev = row[0] if row and row[0] else store_sql.GENESIS
                now = to_naive(utcnow())
                rows = []
                for e in fresh:
                    h = store_sql.chain_hash(prev, e)
                    d = store_sql._row(e, now, prev, h)
                    if not cols:
                        cols.extend(d)
                    rows.append(tuple(dt(d[c]) for c in cols))
                    prev = h
                cur.executemany(f"INSERT INTO usage_events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                rows)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        finally:
            raw.close()
        return [e.request_id for e in fresh]

    store_sql.UsageStore.append_batch = append_batch  # type: ignore[method-assign]


@patch("ledger_inline")
def _ledger_inline() -> None:
    """The ledger commits on the event loop instead of via asyncio.to_thread (only sensible with
    sqlite_normal + raw_ledger, where a commit takes tens of µs): measures the thread hand-off."""
    import types

    from metering import ledger

    async def to_thread(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    shim = types.SimpleNamespace(**{k: getattr(asyncio, k) for k in dir(asyncio) if not k.startswith("__")})
    shim.to_thread = to_thread
    ledger.asyncio = shim  # type: ignore[attr-defined]


@patch("langid_off")
def _langid_off() -> None:
    from metering.language import LanguageDetector

    LanguageDetector.detect = lambda self, text: "en"  # type: ignore[method-assign]


@patch("read_receive")
def _read_receive() -> None:
    from serving.errors import BodyTooLarge
    from serving.openai import service

    async def read_body(request: Any, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        receive = request.receive
        msg = await receive()
        body = msg.get("body", b"")
        if not msg.get("more_body", False) and len(body) <= limit:
            return body
        chunks = [body]
        size = len(body)
        while msg.get("more_body", False):
            msg = await receive()
            part = msg.get("body", b"")
            size += len(part)
            if size > limit:
                raise BodyTooLarge(f"Request body is larger than the limit of {limit} bytes.")
            chunks.append(part)
        if size > limit:
            raise BodyTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        return b"".join(chunks)

    service.read_body = read_body


@patch("labels_cache")
def _labels_cache() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    orig = MetricWrapperBase.labels

    def labels(self: Any, *values: Any, **kw: Any) -> Any:
        if kw:
            return orig(self, *values, **kw)
        cache = self.__dict__.get("_tp_children")
        if cache is None:
            cache = self.__dict__["_tp_children"] = {}
        child = cache.get(values)
        if child is None:
            child = cache[values] = orig(self, *values)
        return child

    MetricWrapperBase.labels = labels  # type: ignore[method-assign]


@patch("fastpath")
def _fastpath() -> None:
    from starlette.requests import Request

    import serving.app as app_mod
    from serving.errors import TokenportError
    from serving.openai.protocol import ChatCompletionRequest, CompletionRequest
    from serving.openai.service import OpenAIService, new_request_id

    captured: dict[str, Any] = {}
    orig_init = OpenAIService.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        orig_init(self, *a, **kw)
        captured["service"] = self

    OpenAIService.__init__ = init  # type: ignore[method-assign]
    orig_create = app_mod.create_app
    routes = {"/v1/chat/completions": (ChatCompletionRequest, "chat.completions"),
              "/v1/completions": (CompletionRequest, "completions")}

    def create_app(settings: Any, **kw: Any) -> Any:
        app = orig_create(settings, **kw)
        svc = captured["service"]
        metrics = svc.forwarder.metrics

        async def fast(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in routes:
                schema, endpoint = routes[scope["path"]]
                rid = new_request_id()
                scope["tokenport.request_id"] = rid
                try:
                    resp = await svc.handle(Request(scope, receive), schema, endpoint, scope["path"])
                except TokenportError as exc:
                    resp = app_mod._error_response(exc)
                resp.raw_headers.append((b"x-request-id", rid.encode()))
                metrics.responses.labels(scope["path"], str(resp.status_code)).inc()
                await resp(scope, receive, send)
                return
            await app(scope, receive, send)

        return fast

    app_mod.create_app = create_app


@patch("relay_asgi")
def _relay_asgi() -> None:
    from serving.proxy.relay import RelayResponse

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        state = {"done": False, "disconnected": False}

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return

        def on_disconnect(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and not state["done"] and task is not None:
                state["disconnected"] = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        watcher.add_done_callback(on_disconnect)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state["done"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise
        finally:
            state["done"] = True
            watcher.cancel()
            self.relay.abandon()

    RelayResponse.__call__ = call  # type: ignore[method-assign]


@patch("coalesce")
def _coalesce() -> None:
    import aiohttp
    import orjson

    from metering.events import Outcome
    from serving.errors import UpstreamError
    from serving.proxy import relay as relay_mod

    async def body(self: Any) -> Any:
        meter = self.meter
        rest = b""
        try:
            async for data in self.resp.content.iter_any():
                t = time.perf_counter()
                *lines, rest = (rest + data).split(b"\n")
                out: list[bytes] = []
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        if out:
                            yield b"".join(out)
                        await self._end(Outcome.OK)
                        yield relay_mod.DONE
                        return
                    try:
                        obj = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(obj, dict):
                        continue
                    if "error" in obj:
                        if out:
                            yield b"".join(out)
                        await self._end(Outcome.UPSTREAM_ERROR)
                        yield b"data: " + payload + b"\n\n"
                        return
                    usage = obj.get("usage")
                    if usage:
                        meter.take_usage(usage)
                    if obj.get("choices"):
                        self.content_chunks += 1
                        if self._first:
                            self._first = False
                            self.metrics.ttft.labels(self.metrics.model_label(meter.model)).observe(
                                time.perf_counter() - self.t0)
                    o = self._transform(obj, payload)
                    if o is not None:
                        out.append(b"data: " + o + b"\n\n")
                self.overhead += time.perf_counter() - t
                if out:
                    yield b"".join(out)
            await self._end(Outcome.UPSTREAM_ERROR)
            yield UpstreamError("The worker ended the stream unexpectedly.").sse_event()
        except (TimeoutError, aiohttp.ClientError):
            await self._end(Outcome.UPSTREAM_ERROR)
            yield UpstreamError("The worker failed while streaming.").sse_event()
        finally:
            self.resp.release()

    relay_mod.StreamRelay.body = body  # type: ignore[method-assign]


def main() -> None:
    argv = sys.argv[1:]
    names: list[str] = []
    if argv[:1] == ["--patches"]:
        names = [n for n in argv[1].split(",") if n]
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        sys.exit(f"unknown patch(es) {unknown}; known: {', '.join(PATCHES)}")
    for n in names:
        PATCHES[n]()
    from serving.cli import main as cli_main

    sys.argv = ["tokenport", *argv]
    cli_main()


if __name__ == "__main__":
    main()
