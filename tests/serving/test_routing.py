"""Worker selection and health: retry on a refused connection, 503 without a healthy worker,
/readyz, /healthz and /v1/models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import openai
import pytest

from metering.events import Outcome
from tests.conftest import MODEL, OTHER_MODEL, Gateway, GatewayFactory, TenantKey, metric
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error, auth, chat_body, stream_raw

MESSAGES = [{"role": "user", "content": "hi"}]
FakeFactory = Callable[[], Awaitable[FakeWorker]]


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
async def test_refused_connection_is_retried_on_another_worker(
    gateway_factory: GatewayFactory, fake_factory: FakeFactory, stream: bool
) -> None:
    first, second = await fake_factory(), await fake_factory()
    # Health checks only at start (both healthy), so the first pick is the first worker.
    gw = await gateway_factory(
        [(MODEL, "w-first", first.url), (MODEL, "w-second", second.url)], health_interval_s=60
    )
    tenant, _key, plain = gw.new_tenant()
    await first.stop()  # its port now refuses connections

    rid: str | None
    if stream:
        out = await stream_raw(gw.http, plain, chat_body(stream=True))
        assert out.status == 200 and out.done
        rid = out.request_id
    else:
        done = await gw.client(plain).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        assert done.usage is not None and done.usage.completion_tokens == 3
        rid = done._request_id
    assert first.completion_requests() == []
    assert len(second.completion_requests()) == 1
    [stored] = gw.events_for(tenant.id)
    assert stored.event.request_id == rid
    assert stored.event.outcome is Outcome.OK
    assert (stored.event.worker_id, stored.event.serving_region) == ("w-second", "region-w-second")
    text = await gw.metrics()
    assert metric(text, "tokenport_worker_healthy", worker="w-first") == 0
    assert metric(text, "tokenport_worker_healthy", worker="w-second") == 1
    assert (await gw.http.get("/readyz")).status_code == 200  # the model still has a healthy worker


async def test_every_worker_refusing_is_502_metered_once(
    gateway_factory: GatewayFactory, fake_factory: FakeFactory
) -> None:
    a, b = await fake_factory(), await fake_factory()
    gw = await gateway_factory([(MODEL, "w-a", a.url), (MODEL, "w-b", b.url)], health_interval_s=60)
    tenant, _key, plain = gw.new_tenant()
    await a.stop()
    await b.stop()
    with pytest.raises(openai.InternalServerError) as info:
        await gw.client(plain).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert_openai_error(info.value.response, 502, code="upstream_error")
    [stored] = gw.events_for(tenant.id)
    assert stored.event.outcome is Outcome.UPSTREAM_ERROR
    assert stored.event.request_id == info.value.request_id


async def test_no_healthy_worker_is_503_and_readyz_follows_health(
    gateway_factory: GatewayFactory, fake_factory: FakeFactory
) -> None:
    fake = await fake_factory()
    gw = await gateway_factory([(MODEL, "w0", fake.url)], health_interval_s=0.05)
    tenant, _key, plain = gw.new_tenant()
    client = gw.client(plain)
    r = await gw.http.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "models": [MODEL]}

    port = fake.port
    await fake.stop()

    async def not_ready() -> bool:
        return (await gw.http.get("/readyz")).status_code == 503

    await _until(not_ready)
    assert_openai_error(await gw.http.get("/readyz"), 503, type="service_unavailable", code="not_ready")
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 503
    assert_openai_error(
        info.value.response,
        503,
        type="service_unavailable",
        code="no_healthy_worker",
    )
    assert gw.events_for(tenant.id) == []  # nothing was generated, nothing is metered
    assert (await gw.http.get("/healthz")).status_code == 200  # liveness is not readiness

    # The worker comes back on its port: ready again, and requests flow.
    await fake.start(port=port)

    async def ready() -> bool:
        return (await gw.http.get("/readyz")).status_code == 200

    await _until(ready)
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert done.choices[0].message.content == " w0 w1 w2"
    assert [e.event.outcome for e in gw.events_for(tenant.id)] == [Outcome.OK]


async def test_unhealthy_by_status_is_not_picked(
    gateway_factory: GatewayFactory, fake_factory: FakeFactory
) -> None:
    sick, well = await fake_factory(), await fake_factory()
    sick.behave(health_status=503)
    gw = await gateway_factory(
        [(MODEL, "w-sick", sick.url), (MODEL, "w-well", well.url)], health_interval_s=0.05
    )
    _tenant, _key, plain = gw.new_tenant()
    for _ in range(4):
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
        assert r.status_code == 200
    assert sick.completion_requests() == []
    assert len(well.completion_requests()) == 4


async def test_healthz_and_readyz(gateway: Gateway) -> None:
    r = await gateway.http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await gateway.http.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "models": [MODEL, OTHER_MODEL]}


async def test_models_lists_only_what_the_tenant_may_use(gateway: Gateway, tenant: TenantKey) -> None:
    everything = await gateway.client(tenant.api_key).models.list()
    assert sorted(m.id for m in everything.data) == sorted([MODEL, OTHER_MODEL])
    assert all(m.object == "model" and m.owned_by == "tokenport" for m in everything.data)

    _t, _k, only_one = gateway.new_tenant(allowed_models=[MODEL, "not-in-the-catalogue"])
    page = await gateway.client(only_one).models.list()
    assert [m.id for m in page.data] == [MODEL]

    _t, _k, none = gateway.new_tenant(allowed_models=["not-in-the-catalogue"])
    page = await gateway.client(none).models.list()
    assert page.data == []

    r = await gateway.http.get("/v1/models", headers=auth(only_one))
    assert r.json()["object"] == "list"
