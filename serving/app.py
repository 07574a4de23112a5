"""create_app(settings) -> FastAPI: builds every part, wires routes, errors and the lifespan. Wiring only."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from metering.geo import OriginResolver
from metering.language import LanguageDetector
from metering.ledger import Ledger, Spool
from metering.metrics import Metrics
from metering.reconcile import DriftRow, PeriodicReconciler, Target
from metering.recorder import Recorder
from metering.tokencount import TokenCounter
from serving import admin, db_schema, ops, tenant
from serving.api_errors import install_error_handlers
from serving.auth import AdminAuth, KeyRing
from serving.batches import routes as batch_routes
from serving.batches.execute import LineExecutor
from serving.batches.files import DiskFileStore
from serving.batches.runner import BatchRunner
from serving.batches.service import BatchService
from serving.batches.store import BatchStore
from serving.deps import AppServices, install
from serving.idempotency import Idempotency, IdempotencyStore
from serving.limits.http_timeouts import BodyGuardMiddleware
from serving.limits.wiring import build_guardrails
from serving.metrics_listener import MetricsListener
from serving.openai import models, routes, stored
from serving.openai.capabilities import Capabilities
from serving.openai.protocol import hoist_defs
from serving.pipeline import Pipeline
from serving.proxy.discovery import Discovery, DnsLookup, WorkersFileError
from serving.proxy.forward import Forwarder
from serving.proxy.kube import EndpointSlices
from serving.proxy.language_routing import LanguageRouter
from serving.proxy.pool import Worker, WorkerPool
from serving.services import open_stores
from serving.settings import ConfigError, Settings
from serving.spend import SpendEstimator
from serving.workers.prepare import tokenizer_folders

log = logging.getLogger("tokenport.gateway")


@dataclass(frozen=True)
class ExtraWorker:
    """A worker given on the command line: `--worker MODEL=BASE_URL`."""

    model: str
    base_url: str
    region: str = "remote"


def build_workers(settings: Settings, extra: Iterable[ExtraWorker] = ()) -> list[Worker]:
    workers = [
        Worker(w.id, m.name, w.url(), w.region, router=w.router, health_path=w.health_path)
        for m in settings.catalogue.models
        for w in m.workers
    ]
    for i, e in enumerate(extra):
        workers.append(Worker(id=f"cli-{i}", model=e.model, url=e.base_url.rstrip("/"), region=e.region))
    return workers


def served_models(settings: Settings, workers: Iterable[Worker], with_file: bool) -> list[str]:
    """Models with a worker, or every catalogue model when a workers file may give them workers later
    (fixed for the process's life: tokenizers, metric labels and prices are per model)."""
    names = [w.model for w in workers]
    if with_file:
        names = [m.name for m in settings.catalogue.models] + names
    return list(dict.fromkeys(names))


def create_app(
    settings: Settings, *, extra_workers: Iterable[ExtraWorker] = (), migrate: bool = True
) -> FastAPI:
    stores = open_stores(settings, migrate=False)  # migrated in the lifespan
    engine, usage = stores.engine, stores.usage
    workers = build_workers(settings, extra_workers)
    workers_file = settings.workers.file
    if workers_file is not None and not workers_file.is_absolute():
        workers_file = settings.config_dir / workers_file
    served = served_models(settings, workers, workers_file is not None)
    metrics = Metrics(served, max_tenants=settings.gateway.max_tenant_labels)
    ledger = Ledger(
        usage,
        Spool(settings.data_dir / "spool" / "usage.jsonl"),
        on_commit=metrics.observe_commit,
        fail_closed=settings.metering.fail_closed,
    )
    keyring = KeyRing(stores.tenants, settings.secret_key, settings.gateway.key_cache_refresh_s)
    spend = SpendEstimator(
        stores.prices, metrics, keyring.tenant
    )  # the same price source as budgets and billing
    tokens = TokenCounter(tokenizer_folders(settings, set(served)))
    guardrails = build_guardrails(settings, stores, metrics, tokens)

    ledger.subscribe(
        guardrails.limiter.on_event, guardrails.limiter.on_lost
    )  # settle or release budget holds
    ledger.subscribe(spend.observe)
    recorder = Recorder(ledger, metrics)  # subscribes the metrics
    pool = WorkerPool(
        workers,
        interval_s=settings.workers.health_interval_s,
        on_health=lambda w: metrics.worker_healthy.labels(w.id, w.model).set(1 if w.healthy else 0),
        routing=settings.gateway.routing,
        eject_after=settings.workers.eject_after_failures,
        eject_base_s=settings.workers.eject_base_s,
        eject_max_s=settings.workers.eject_max_s,
        on_eject=lambda w: metrics.worker_ejections.labels(w.id, w.model).inc(),
        on_gone=metrics.forget_worker,
        models=served,
    )
    discovery = None
    if workers_file is not None:
        dns = DnsLookup()
        discovery = Discovery(
            pool,
            workers,
            workers_file,
            settings.workers.refresh_s,
            lookups={"dns": dns, "srv": dns, "endpointslices": EndpointSlices()},
            on_error=lambda source: metrics.discovery_errors.labels(source).inc(),
            on_refresh=lambda: metrics.count_workers(pool.models, pool.workers),
        )
        try:
            discovery.read(strict=True)  # a bad file at start stops the start with its reason
        except WorkersFileError as exc:
            raise ConfigError(f"workers.file: {exc}") from exc
    forwarder = Forwarder(
        pool,
        recorder,
        metrics,
        timeout_s=settings.gateway.request_timeout_s,
        tokens=tokens,
        session_header=settings.gateway.session_header,
    )
    origin = OriginResolver(
        settings.gateway.origin_country_header, settings.gateway.trusted_proxies, settings.gateway.geoip_db
    )
    idempotency = Idempotency(
        IdempotencyStore(engine),
        usage,
        ttl_s=settings.metering.idempotency_ttl_s,
        stale_after_s=settings.gateway.request_timeout_s + 60,
    )
    language = LanguageDetector(settings.metering.languages)
    batch_store, batch_files = BatchStore(engine), DiskFileStore(settings.data_dir / "files")
    runner = BatchRunner(
        batch_store,
        batch_files,
        LineExecutor(keyring, guardrails.guard, forwarder, language),
        settings.batches,
        lease_s=settings.gateway.request_timeout_s + 60,
        ledger_has=lambda rid: usage.get(rid) is not None,
        live_inflight=lambda: sum(w.inflight for w in pool.workers),
    )
    batches = BatchService(
        batch_store, batch_files, settings.batches, endpoints=routes.ROUTES.keys, wake=runner.wake
    )

    def set_drift(row: DriftRow) -> None:
        metrics.drift_tokens.labels(row.worker, row.model, row.token_type).set(row.drift)
        metrics.drift_ratio.labels(row.worker, row.model, row.token_type).set(row.ratio)

    gw = settings.gateway
    listener = (
        MetricsListener(metrics, gw.metrics_host, gw.metrics_port) if gw.metrics_port is not None else None
    )
    reconciler = PeriodicReconciler(
        usage,
        # a router has no engine counters to reconcile against
        lambda: [Target(w.id, w.model, w.url) for w in pool.workers if not w.router],
        set_drift,
        settings.metering.reconcile_interval_s,
        lambda: forwarder.session,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            db_schema.upgrade(engine)
        await ledger.start()
        await keyring.start()
        await guardrails.start()
        session = await forwarder.start()
        await pool.start(session)
        if discovery is not None:
            await discovery.start()
        await idempotency.start()
        reconciler.start()
        if listener is not None:
            await listener.start()
        runner.start()  # batches in progress before a restart carry on
        # Everything loaded so far (FastAPI, pydantic, SQLAlchemy, tokenizers: ~1M objects) lives as
        # long as the process: out of the cyclic GC's sight, so a full collection does not walk it
        # again on the request path (the pause was a ~ms tail on requests).
        gc.collect()
        gc.freeze()
        log.info(
            "gateway ready: %d worker(s) for %s", len(pool.workers), ", ".join(pool.models) or "no models"
        )
        try:
            yield
        finally:
            await runner.close()  # running batch lines end (or are settled) while the ledger still runs
            if listener is not None:
                await listener.close()
            await reconciler.close()
            if discovery is not None:
                await discovery.close()
            await pool.close()
            await keyring.close()
            await ledger.close()  # flush every queued usage event
            await guardrails.close()  # settle what those events hold
            await idempotency.close()
            origin.close()
            await forwarder.close()
            engine.dispose()

    app = FastAPI(
        title="Tokenport",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible gateway with exact per-tenant, per-country token metering.",
    )
    install(
        app,
        AppServices(
            stores=stores,
            keyring=keyring,
            admin=AdminAuth(settings.admin_token),
            policies=guardrails.policies,
            limiter=guardrails.limiter,
            pool=pool,
            metrics=metrics,
            batches=batches,
            metrics_token=gw.metrics_token,
            metrics_listener=listener,
        ),
    )
    app.include_router(routes.router())  # documents the completion routes; the Pipeline serves them
    app.include_router(models.router(created=int(time.time())))
    app.include_router(stored.router)  # GET/DELETE /v1/responses/{id}
    app.include_router(batch_routes.router)
    for router in (*tenant.ROUTERS, *admin.ROUTERS, ops.router):
        app.include_router(router)
    install_error_handlers(app, metrics)

    app.add_middleware(
        BodyGuardMiddleware,
        max_bytes=settings.gateway.max_body_bytes,
        timeout_s=settings.gateway.body_timeout_s,
        path_max_bytes={"/v1/files": settings.batches.max_file_bytes},
    )
    # outermost: the completion pipeline (serving/pipeline.py); the rest goes on to FastAPI
    app.add_middleware(
        Pipeline,
        keyring=keyring,
        origin=origin,
        language=language,
        idempotency=idempotency,
        guard=guardrails.guard,
        forwarder=forwarder,
        metrics=metrics,
        max_body_bytes=settings.gateway.max_body_bytes,
        body_timeout_s=settings.gateway.body_timeout_s,
        routing=LanguageRouter.from_catalogue(settings.catalogue, pool),
        capabilities=Capabilities(settings.catalogue),
    )
    app.openapi_schema = hoist_defs(app.openapi())  # inline request schemas' $defs -> components
    return app
