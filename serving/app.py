"""create_app(settings) -> FastAPI: builds every part, wires routes, errors and the lifespan. Wiring only."""

from __future__ import annotations

import gc
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
from metering.ledger import Ledger, LedgerUnavailable, Spool
from metering.metrics import Metrics
from metering.reconcile import DriftRow, PeriodicReconciler, Target
from metering.recorder import Recorder
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from metering.tokencount import TokenCounter
from serving import db_schema, invoices_api, usage_api
from serving.admin import audit as admin_audit
from serving.admin import invoices as admin_invoices
from serving.admin import reports as admin_reports
from serving.admin import tenants as admin_tenants
from serving.admin import usage as admin_usage
from serving.admin.auth import AdminAuth
from serving.auth import KeyRing
from serving.errors import InvalidRequest, NotFound, ServiceUnavailable, TokenportError
from serving.front import Front, error_response, ledger_unavailable
from serving.idempotency import Idempotency, IdempotencyMiddleware, IdempotencyStore
from serving.limits.http_timeouts import BodyGuardMiddleware
from serving.limits.wiring import Guardrails, build_guardrails
from serving.openai import chat, completions, models
from serving.openai.protocol import hoist_defs
from serving.openai.service import OpenAIService, new_request_id
from serving.proxy.forward import Forwarder
from serving.proxy.pool import Worker, WorkerPool
from serving.settings import Settings
from serving.spend import SpendEstimator

log = logging.getLogger("tokenport.gateway")
JSON = "application/json"

# Routers beyond the OpenAI endpoints: each is `build(platform) -> APIRouter`, one module per area
# (tenant usage and invoices, admin usage, invoices, reports, tenants and keys).
ROUTERS: list[Callable[[Platform], APIRouter]] = [admin_tenants.build, admin_audit.build,
                                               admin_invoices.build, admin_reports.build, invoices_api.build,
                                               usage_api.build, admin_usage.build]


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
        scope.setdefault("tokenport.request_id", new_request_id())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # read now: an idempotent replay answers with the id of the request it replays
                header = (b"x-request-id", str(scope["tokenport.request_id"]).encode())
                message["headers"] = [*message.get("headers", []), header]
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                self.metrics.child(self.metrics.responses, path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_id)


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
    guardrails: Guardrails  # limits, budgets, audit log, content logging


def create_app(settings: Settings, *, extra_workers: Iterable[ExtraWorker] = (),
               migrate: bool = True) -> FastAPI:
    engine = make_engine(settings.db_url, sqlite_synchronous=settings.metering.sqlite_synchronous)
    tenants = TenantStore(engine, settings.secret_key)
    usage = UsageStore(engine, append_wait_s=settings.metering.spool_after_s)
    workers = build_workers(settings, extra_workers)
    metrics = Metrics({w.model for w in workers}, max_tenants=settings.gateway.max_tenant_labels)
    ledger = Ledger(usage, Spool(settings.data_dir / "spool" / "usage.jsonl"), on_commit=metrics.observe_commit,
                    fail_closed=settings.metering.fail_closed)
    keyring = KeyRing(tenants, settings.secret_key, settings.gateway.key_cache_refresh_s)
    spend = SpendEstimator.from_file(settings.config_dir / "billing" / "price_books.yaml", metrics, keyring.tenant)
    tokens = TokenCounter.from_models_dir(settings.models_dir, {w.model for w in workers})
    guardrails = build_guardrails(settings, engine, tenants, usage, metrics, tokens)

    ledger.subscribe(guardrails.limiter.on_event, guardrails.limiter.on_lost)  # settle or release budget holds
    ledger.subscribe(spend.observe)
    recorder = Recorder(ledger, metrics)  # subscribes the metrics
    pool = WorkerPool(workers, interval_s=settings.workers.health_interval_s,
                      on_health=lambda w: metrics.worker_healthy.labels(w.id, w.model).set(1 if w.healthy else 0))
    forwarder = Forwarder(pool, recorder, metrics, timeout_s=settings.gateway.request_timeout_s, tokens=tokens)
    origin = OriginResolver(settings.gateway.origin_country_header, settings.gateway.trusted_proxies,
                            settings.gateway.geoip_db)
    service = OpenAIService(keyring, forwarder, origin,
                            LanguageDetector(settings.metering.languages), guard=guardrails.guard)
    service.idempotency = idempotency = Idempotency(
        IdempotencyStore(engine), usage, ttl_s=settings.metering.idempotency_ttl_s,
        stale_after_s=settings.gateway.request_timeout_s + 60)
    def set_drift(row: DriftRow) -> None:
        metrics.drift_tokens.labels(row.worker, row.model, row.token_type).set(row.drift)
        metrics.drift_ratio.labels(row.worker, row.model, row.token_type).set(row.ratio)

    reconciler = PeriodicReconciler(usage, lambda: [Target(w.id, w.model, w.url) for w in pool.workers], set_drift,
                                    settings.metering.reconcile_interval_s, lambda: forwarder.session)
    platform = Platform(settings=settings, engine=engine, tenants=tenants, usage=usage, metrics=metrics,
                        ledger=ledger, recorder=recorder, keyring=keyring, pool=pool, forwarder=forwarder,
                        service=service, admin=AdminAuth(settings.admin_token), guardrails=guardrails)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            db_schema.upgrade(engine)
        await ledger.start()
        await keyring.start()
        await guardrails.start()
        session = await forwarder.start()
        await pool.start(session)
        await idempotency.start()
        reconciler.start()
        # Everything loaded so far (FastAPI, pydantic, SQLAlchemy, tokenizers: ~1M objects) lives as
        # long as the process: out of the cyclic GC's sight, so a full collection does not walk it
        # again on the request path (the pause was a ~ms tail on requests).
        gc.collect()
        gc.freeze()
        log.info("gateway ready: %d worker(s) for %s", len(workers), ", ".join(pool.models) or "no models")
        try:
            yield
        finally:
            await reconciler.close()
            await pool.close()
            await keyring.close()
            await ledger.close()  # flush every queued usage event
            await guardrails.close()  # settle what those events hold
            await idempotency.close()
            origin.close()
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
        return error_response(exc)

    @app.exception_handler(LedgerUnavailable)
    async def on_ledger_unavailable(_r: Request, _exc: LedgerUnavailable) -> Response:
        return error_response(ledger_unavailable())

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_r: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
        return error_response(InvalidRequest(str(err.get("msg")), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_r: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound("Unknown route.", code="unknown_route"))
        err = TokenportError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "api_error"
        return error_response(err)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette runs this handler outside RequestIdMiddleware: add the id and count it here.
        log.exception("unexpected error", exc_info=exc)
        err = TokenportError("The gateway had an internal error.")
        request_id = str(request.scope.get("tokenport.request_id") or new_request_id())
        err.headers = {"X-Request-Id": request_id}
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.responses.labels(route, "500").inc()
        return error_response(err)

    app.add_middleware(BodyGuardMiddleware, max_bytes=settings.gateway.max_body_bytes,
                       timeout_s=settings.gateway.body_timeout_s)
    app.add_middleware(IdempotencyMiddleware, idempotency=idempotency)
    app.add_middleware(RequestIdMiddleware, metrics=metrics)
    # outermost: the completion routes' short path (serving/front.py); the rest goes on to FastAPI
    app.add_middleware(Front, service=service, metrics=metrics, max_body_bytes=settings.gateway.max_body_bytes,
                       body_timeout_s=settings.gateway.body_timeout_s)
    app.openapi_schema = hoist_defs(app.openapi())  # inline request schemas' $defs -> components
    return app
