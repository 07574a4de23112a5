"""Shared fixtures for the unit tests: a fake vLLM worker and a real gateway (uvicorn on loopback).

The gateway is built exactly as `tokenport gateway` builds it: `load_settings(config_file=...)` on a
temporary tokenport.yaml + models.yaml, `create_app(settings)`, served by uvicorn in the test's event
loop. Tests talk to it with the official `openai` client and with httpx, and read the ledger back
with `UsageStore` on their own engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import openai
import pytest
import uvicorn
import yaml
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

import serving.app
from metering.db import make_engine
from metering.language import LanguageDetector
from metering.store_sql import StoredEvent, UsageStore
from metering.tenants import ApiKey, Tenant, TenantStore
from serving import db_schema
from serving.app import create_app
from serving.deps import of_app
from serving.limits.http_timeouts import uvicorn_options
from serving.settings import Settings, load_settings
from tests.fakes import FakeWorker

MODEL = "smollm2-135m-instruct"
OTHER_MODEL = "tiny-other"


# --- metrics -------------------------------------------------------------------------------
def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# --- the gateway ---------------------------------------------------------------------------
@dataclass
class Gateway:
    url: str
    settings: Settings
    app: FastAPI
    engine: Engine
    tenants: TenantStore
    usage: UsageStore
    server: uvicorn.Server
    task: asyncio.Task[None]
    http: httpx.AsyncClient
    _clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, api_key: str, **kw: Any) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=kw.pop("timeout", 15.0), **kw
        )
        self._clients.append(c)
        return c

    def new_tenant(
        self, *, billing_country: str = "DE", allowed_models: list[str] | None = None, **kw: Any
    ) -> tuple[Tenant, ApiKey, str]:
        tid = "t-" + uuid.uuid4().hex[:10]
        tenant = self.tenants.create_tenant(
            id=tid, name=f"Tenant {tid}", billing_country=billing_country, allowed_models=allowed_models, **kw
        )
        key, plaintext = self.tenants.create_key(tid, name="test")
        return tenant, key, plaintext

    @property
    def metrics_url(self) -> str:
        """The operator's metrics listener (gateway.metrics_port 0 in tests: a free loopback port)."""
        listener = of_app(self.app).metrics_listener
        assert listener is not None
        return f"http://{listener.host}:{listener.port}/metrics"

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=15) as h:
            r = await h.get(self.metrics_url)
        assert r.status_code == 200
        return r.text

    async def wait_event(self, request_id: str, timeout: float = 5.0) -> StoredEvent:
        deadline = time.monotonic() + timeout
        while True:
            ev = await asyncio.to_thread(self.usage.get, request_id)
            if ev is not None:
                return ev
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger row for {request_id} within {timeout}s")
            await asyncio.sleep(0.02)

    def events_for(self, tenant_id: str) -> list[StoredEvent]:
        return list(self.usage.iter_events(tenant_id=tenant_id))

    async def stop(self) -> None:
        for c in self._clients:
            await c.close()
        await self.http.aclose()
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, 15)
        finally:
            self.engine.dispose()


def write_config(
    directory: Path,
    workers: list[tuple[str, str, str]],
    *,
    health_interval_s: float,
    gateway: dict[str, Any] | None = None,
    catalogue_extra: dict[str, Any] | None = None,
    model_specs: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """tokenport.yaml + models.yaml; `workers` is [(model, worker id, base_url)]; `catalogue_extra`:
    more catalogue keys (e.g. `routes`), and under `models` more fields per model name (e.g. `languages`);
    `model_specs`: more catalogue fields per model (e.g. {"embed": {"kind": "embedding"}})."""
    directory.mkdir(parents=True, exist_ok=True)
    models: dict[str, list[dict[str, str]]] = {}
    for model, wid, url in workers:
        models.setdefault(model, []).append({"id": wid, "base_url": url, "region": f"region-{wid}"})
    extra = dict(catalogue_extra or {})
    per_model = extra.pop("models", {})
    catalogue = {
        "default_model": next(iter(models)),
        "models": [
            {"name": m, "workers": ws, **per_model.get(m, {}), **(model_specs or {}).get(m, {})}
            for m, ws in models.items()
        ],
        **extra,
    }
    (directory / "models.yaml").write_text(yaml.safe_dump(catalogue), encoding="utf-8")
    cfg = {
        "mode": "local",
        "data_dir": str(directory / "data"),
        "models_file": "models.yaml",
        # loopback trusted explicitly (the default trusts no proxy): tests set X-Client-Country themselves
        "gateway": {
            "host": "127.0.0.1",
            "max_tenant_labels": 1000,
            "metrics_port": 0,
            "trusted_proxies": ["127.0.0.1/32", "::1/128"],
            **(gateway or {}),
        },
        "workers": {"health_interval_s": health_interval_s},
    }
    path = directory / "tokenport.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@functools.cache
def _shared_detector() -> LanguageDetector:
    return LanguageDetector()


@asynccontextmanager
async def run_gateway(
    directory: Path,
    workers: list[tuple[str, str, str]],
    *,
    health_interval_s: float = 0.1,
    gateway: dict[str, Any] | None = None,
    catalogue_extra: dict[str, Any] | None = None,
    model_specs: dict[str, dict[str, Any]] | None = None,
) -> AsyncIterator[Gateway]:
    """A gateway on a free loopback port over `workers` ([(model, worker id, base_url)])."""
    settings = load_settings(
        config_file=write_config(
            directory,
            workers,
            health_interval_s=health_interval_s,
            gateway=gateway,
            catalogue_extra=catalogue_extra,
            model_specs=model_specs,
        )
    )
    engine = make_engine(settings.db_url)
    db_schema.upgrade(engine)
    # The language model takes ~0.7 s to load: gateways in one test session share one detector.
    shared = (
        mock.patch.object(serving.app, "LanguageDetector", return_value=_shared_detector())
        if hasattr(serving.app, "LanguageDetector")
        else contextlib.nullcontext()
    )
    with shared:
        app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # As `tokenport gateway` runs it (serving/cli/run.py): no uvicorn proxy-header rewriting (geo.py judges
    # X-Forwarded-For against gateway.trusted_proxies) and the slow-client protections.
    gw_settings = settings.gateway
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        proxy_headers=False,
        **uvicorn_options(
            gw_settings.header_timeout_s,
            gw_settings.max_header_bytes,
            gw_settings.keep_alive_s,
            gw_settings.max_connections,
        ),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 20
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the gateway stopped during startup")
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not start")
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    gw = Gateway(
        url=url,
        settings=settings,
        app=app,
        engine=engine,
        tenants=TenantStore(engine, settings.secret_key),
        usage=UsageStore(engine),
        server=server,
        task=task,
        http=httpx.AsyncClient(base_url=url, timeout=15),
    )
    try:
        yield gw
    finally:
        await gw.stop()
        sock.close()


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
async def fake() -> AsyncIterator[FakeWorker]:
    """One fake worker for the session (use `worker` in tests: it resets the knobs)."""
    f = await FakeWorker().start()
    try:
        yield f
    finally:
        await f.stop()


@pytest.fixture
def worker(fake: FakeWorker) -> Iterator[FakeWorker]:
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture(scope="session")
async def gateway(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """The shared gateway: both catalogue models served by the session's fake worker."""
    directory = tmp_path_factory.mktemp("gateway")
    async with run_gateway(
        directory,
        [(MODEL, "fake-0", fake.url), (OTHER_MODEL, "fake-1", fake.url)],
        health_interval_s=0.2,
        gateway={"max_body_bytes": 8192},
    ) as gw:
        yield gw


@dataclass
class TenantKey:
    tenant: Tenant
    key: ApiKey
    api_key: str


@pytest.fixture
def tenant(gateway: Gateway) -> TenantKey:
    """A fresh tenant (billing country DE, every model) with one key: metrics labels stay per test."""
    t, k, plain = gateway.new_tenant()
    return TenantKey(t, k, plain)


@pytest.fixture
async def client(gateway: Gateway, tenant: TenantKey) -> openai.AsyncOpenAI:
    return gateway.client(tenant.api_key)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start extra gateways with their own workers and database; all stopped at teardown."""
    stack: list[Any] = []

    async def start(workers: list[tuple[str, str, str]], **kw: Any) -> Gateway:
        cm = run_gateway(tmp_path / f"gw{len(stack)}", workers, **kw)
        gw = await cm.__aenter__()
        stack.append(cm)
        return gw

    try:
        yield start
    finally:
        for cm in reversed(stack):
            await cm.__aexit__(None, None, None)


@pytest.fixture
async def fake_factory() -> AsyncIterator[Callable[[], Awaitable[FakeWorker]]]:
    started: list[FakeWorker] = []

    async def start() -> FakeWorker:
        f = await FakeWorker().start()
        started.append(f)
        return f

    try:
        yield start
    finally:
        for f in started:
            await f.stop()
