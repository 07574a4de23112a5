"""Origin country on the usage event: the trusted header when sent, else the tenant's billing country."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import MODEL, Gateway, GatewayFactory, metric
from tests.fakes import FakeWorker
from tests.serving.helpers import auth, chat_body, stream_raw


@pytest.mark.parametrize(
    ("header", "country", "source"),
    [
        (None, "JP", "tenant"),
        ("FR", "FR", "header"),
        ("br", "BR", "header"),
        ("Cn", "CN", "header"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_origin_country_and_source(
    gateway: Gateway, worker: FakeWorker, header: str | None, country: str, source: str, stream: bool
) -> None:
    tenant, _key, plain = gateway.new_tenant(billing_country="JP")
    extra = {} if header is None else {"X-Client-Country": header}
    if stream:
        out = await stream_raw(gateway.http, plain, chat_body(stream=True), **extra)
        assert out.status == 200 and out.done
        rid = out.request_id
    else:
        r = await gateway.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain, **extra))
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
    ev = (await gateway.wait_event(rid)).event
    assert (ev.origin_country, ev.origin_source) == (country, source)
    text = await gateway.metrics()
    assert (
        metric(
            text,
            "tokenport_tokens_total",
            tenant=tenant.id,
            origin_country=country,
            model=MODEL,
            token_type="output",
        )
        == 3
    )
    assert metric(text, "tokenport_tokens_total", tenant=tenant.id, token_type="output") == 3


async def test_header_name_is_case_insensitive(gateway: Gateway, worker: FakeWorker) -> None:
    _tenant, _key, plain = gateway.new_tenant(billing_country="US")
    r = await gateway.http.post(
        "/v1/chat/completions", json=chat_body(), headers=auth(plain, **{"x-client-country": "ke"})
    )
    ev = (await gateway.wait_event(r.headers["x-request-id"])).event
    assert (ev.origin_country, ev.origin_source) == ("KE", "header")


async def test_header_from_an_untrusted_peer_is_ignored(
    gateway_factory: GatewayFactory, worker: FakeWorker
) -> None:
    # Only 10.0.0.0/8 may set the header: the test client (loopback) may not.
    gw = await gateway_factory([(MODEL, "w0", worker.url)], gateway={"trusted_proxies": ["10.0.0.0/8"]})
    _tenant, _key, plain = gw.new_tenant(billing_country="IN")
    for value in ("US", "not-a-country"):
        r = await gw.http.post(
            "/v1/chat/completions", json=chat_body(), headers=auth(plain, **{"X-Client-Country": value})
        )
        assert r.status_code == 200, r.text
        ev = (await gw.wait_event(r.headers["x-request-id"])).event
        assert (ev.origin_country, ev.origin_source) == ("IN", "tenant")


async def test_geoip_through_a_trusted_proxy(
    gateway_factory: GatewayFactory, worker: FakeWorker, tmp_path: Path
) -> None:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country")
    w.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}})
    db = tmp_path / "country.mmdb"
    w.to_db_file(str(db))
    gw = await gateway_factory([(MODEL, "w0", worker.url)], gateway={"geoip_db": str(db)})
    tenant, _key, plain = gw.new_tenant(billing_country="IN")
    cases = [
        ({"X-Forwarded-For": "81.2.69.142"}, ("GB", "geoip")),
        ({"X-Forwarded-For": "81.2.69.142", "X-Client-Country": "NO"}, ("NO", "header")),
        ({"X-Forwarded-For": "8.8.8.8"}, ("IN", "tenant")),
        ({}, ("IN", "tenant")),
    ]
    for headers, want in cases:
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain, **headers))
        assert r.status_code == 200, r.text
        ev = (await gw.wait_event(r.headers["x-request-id"])).event
        assert (ev.origin_country, ev.origin_source) == want, headers
    text = await gw.metrics()
    assert (
        metric(text, "tokenport_tokens_total", tenant=tenant.id, origin_country="GB", token_type="output")
        == 3
    )
