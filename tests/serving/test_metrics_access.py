"""GET /metrics names every tenant with its volumes and spend: only the operator's scraper reads it
(issue 12). The public port answers it only with the metrics token (unknown route without one); the
separate metrics listener serves it on its own, loopback-by-default address."""

from __future__ import annotations

from pathlib import Path

import httpx

from serving.settings import GatewaySettings
from tests.conftest import MODEL, GatewayFactory, TenantKey
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error, auth, chat_body

TOKEN = "metrics-token-0123456789abcdef"


def test_defaults_keep_metrics_off_the_public_port() -> None:
    gw = GatewaySettings()
    assert gw.metrics_token is None and gw.metrics_host == "127.0.0.1" and gw.metrics_port == 9464


async def test_public_port_without_a_metrics_token_has_no_metrics_route(
    gateway_factory: GatewayFactory, worker: FakeWorker
) -> None:
    gw = await gateway_factory([(MODEL, "f0", worker.url)])
    t, _, api_key = gw.new_tenant()
    assert (
        await gw.http.post("/v1/chat/completions", json=chat_body(max_tokens=2), headers=auth(api_key))
    ).status_code == 200
    for headers in ({}, auth(api_key), {"Authorization": "Bearer local-admin-token"}):
        r = await gw.http.get("/metrics", headers=headers)
        assert_openai_error(r, 404, code="unknown_route")
        assert t.id not in r.text
    text = await gw.metrics()  # the listener, on loopback
    assert f'tenant="{t.id}"' in text
    assert gw.metrics_url.startswith("http://127.0.0.1:") and not gw.metrics_url.endswith(":8000/metrics")
    async with httpx.AsyncClient() as h:
        other = await h.get(gw.metrics_url.removesuffix("/metrics") + "/v1/models", headers=auth(api_key))
    assert other.status_code == 404  # the listener serves nothing else


async def test_public_port_serves_metrics_to_the_metrics_token_only(
    gateway_factory: GatewayFactory, worker: FakeWorker, tmp_path: Path
) -> None:
    gw = await gateway_factory(
        [(MODEL, "f0", worker.url)], gateway={"metrics_token": TOKEN, "metrics_port": None}
    )
    t, _, api_key = gw.new_tenant()
    await gw.http.post("/v1/chat/completions", json=chat_body(max_tokens=2), headers=auth(api_key))
    for headers in (
        {},
        auth(api_key),
        {"Authorization": "Bearer local-admin-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ):
        r = await gw.http.get("/metrics", headers=headers)
        assert_openai_error(r, 401, code="invalid_metrics_token")
        assert t.id not in r.text
    ok = await gw.http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and f'tenant="{t.id}"' in ok.text


async def test_tenant_key_holders_cannot_read_other_tenants_from_the_public_port(
    gateway: object, tenant: TenantKey
) -> None:
    from tests.conftest import Gateway

    assert isinstance(gateway, Gateway)
    r = await gateway.http.get("/metrics", headers=auth(tenant.api_key))
    assert r.status_code == 404 and "tokenport_" not in r.text
