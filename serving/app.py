"""create_app(settings) -> FastAPI: builds every part, wires routes, errors and the lifespan. Wiring only."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering.db import make_engine
from metering.geo import OriginResolver
from metering.language import LanguageDetector
from metering.ledger import Ledger, Spool
from metering.metrics import Metrics
from metering.recorder import Recorder
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from serving import db_schema
from serving.admin.auth import AdminAuth
from serving.auth import KeyRing
from serving.errors import InvalidRequest, NotFound, ServiceUnavailable, TokenportError
from serving.openai import chat, completions, models
from serving.openai.service import OpenAIService, new_request_id
from serving.proxy.forward import Forwarder
from serving.proxy.pool import Worker, WorkerPool
from serving.settings import Settings
from serving.spend import SpendEstimator

log = logging.getLogger("tokenport.gateway")
JSON = "application/json"

# Routers beyond the OpenAI endpoints: each is `build(platform) -> APIRouter`, one module per area
# (tenant usage and invoices, admin usage, invoices, reports, tenants and keys).
ROUTERS: list[Callable[[Platform], APIRouter]] = []


@dataclass(frozen=True)
class ExtraWorker:
    """A worker given on the command line: `--worker MODEL=BASE_URL`."""

    model: str
    base_url: str
    region: str = "remote"


def build_workers(settings: Settings, extra: Iterable[ExtraWorker] = ()) -> list[Worker]:
    workers = [Worker(id=w.id, model=m.name, url=w.url(), region=w.region)
               for m in settings.catalogue.models for w in m.workers]
    for i, e in enumerate(extra):
        workers.append(Worker(id=f"cli-{i}", model=e.model, url=e.base_url.rstrip("/"), region=e.region))
    return workers


class RequestIdMiddleware:
    """Gives every request an id, puts X-Request-Id on every response, counts responses by route."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope.setdefault("tokenport.request_id", new_request_id())
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                self.metrics.responses.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_id)


def _error_response(exc: TokenportError) -> Response:
    return Response(exc.body_bytes(), exc.status_code, headers=exc.headers, media_type=JSON)


@dataclass(frozen=True)
class Platform:
    """Every long-lived part of a gateway process, built once by create_app and handed to routers."""

    settings: Settings
    engine: Engine
    tenants: TenantStore
    usage: UsageStore
    metrics: Metrics
    ledger: Ledger
    recorder: Recorder
    keyring: KeyRing
    pool: WorkerPool
    forwarder: Forwarder
    service: OpenAIService
    admin: AdminAuth


def create_app(settings: Settings, *, extra_workers: Iterable[ExtraWorker] = (),
               migrate: bool = True) -> FastAPI:
    engine = make_engine(settings.db_url)
    tenants = TenantStore(engine, settings.secret_key)
    usage = UsageStore(engine)
    workers = build_workers(settings, extra_workers)
    metrics = Metrics({w.model for w in workers}, max_tenants=settings.gateway.max_tenant_labels)
    ledger = Ledger(usage, Spool(settings.data_dir / "spool" / "usage.jsonl"), on_commit=metrics.observe_commit)
    keyring = KeyRing(tenants, settings.secret_key, settings.gateway.key_cache_refresh_s)
    spend = SpendEstimator.from_file(settings.config_dir / "billing" / "price_books.yaml", metrics, keyring.tenant)
    recorder = Recorder(ledger, metrics, on_event=spend.observe)
    pool = WorkerPool(workers, interval_s=settings.workers.health_interval_s,
                      on_health=lambda w: metrics.worker_healthy.labels(w.id, w.model).set(1 if w.healthy else 0))
    forwarder = Forwarder(pool, recorder, metrics, timeout_s=settings.gateway.request_timeout_s)
    service = OpenAIService(keyring, forwarder, OriginResolver(settings.gateway.origin_country_header),
                            LanguageDetector(), settings.gateway.max_body_bytes)
    platform = Platform(settings=settings, engine=engine, tenants=tenants, usage=usage, metrics=metrics,
                        ledger=ledger, recorder=recorder, keyring=keyring, pool=pool, forwarder=forwarder,
                        service=service, admin=AdminAuth(settings.admin_token))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            db_schema.upgrade(engine)
        await ledger.start()
        await keyring.start()
        session = await forwarder.start()
        await pool.start(session)
        log.info("gateway ready: %d worker(s) for %s", len(workers), ", ".join(pool.models) or "no models")
        try:
            yield
        finally:
            await pool.close()
            await keyring.close()
            await ledger.close()  # flush every queued usage event
            await forwarder.close()
            engine.dispose()

    app = FastAPI(title="Tokenport", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway with exact per-tenant, per-country token metering.")
    app.include_router(chat.router(service))
    app.include_router(completions.router(service))
    app.include_router(models.router(service, created=int(time.time())))
    for build in ROUTERS:
        app.include_router(build(platform))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        if not pool.ready():
            raise ServiceUnavailable("Not ready: some model has no healthy worker.", code="not_ready")
        return Response(orjson.dumps({"status": "ready", "models": pool.models}), media_type=JSON)

    @app.get("/metrics", tags=["ops"])
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(TokenportError)
    async def on_tokenport_error(_r: Request, exc: TokenportError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_r: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
        return _error_response(InvalidRequest(str(err.get("msg")), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_r: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error_response(NotFound("Unknown route.", code="unknown_route"))
        err = TokenportError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "api_error"
        return _error_response(err)

    @app.exception_handler(Exception)
    async def on_unexpected(_r: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return _error_response(TokenportError("The gateway had an internal error."))

    app.add_middleware(RequestIdMiddleware, metrics=metrics)
    return app
