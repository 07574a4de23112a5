"""Tenant isolation: walk every tenant-facing route of the app (whatever routers are registered) as
tenant A, aimed at tenant B in every way a route can be aimed — path parameters, query parameters,
organisation headers, body fields, a shared Idempotency-Key — and prove A never reads or changes B's
keys, limits, usage or invoices. New routes are covered automatically: the walk reads app.routes.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute

from tests.conftest import MODEL, Gateway
from tests.fakes import FakeWorker
from tests.serving.limits_support import ADMIN, REPO, bearer, chat, guarded_gateway

OPS = ("/admin", "/docs", "/redoc", "/openapi.json", "/healthz", "/readyz", "/metrics")
AIM_QUERY = ("tenant", "tenant_id", "key", "key_id", "org", "organization", "user", "who", "account")


@dataclass
class Side:
    tenant_id: str
    name: str
    api_key: str
    key_ids: list[str]
    prefixes: list[str]
    request_ids: list[str] = field(default_factory=list)
    invoices: list[str] = field(default_factory=list)
    marker: str = ""


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    directory = tmp_path_factory.mktemp("isolation")
    shutil.copytree(REPO / "configs" / "billing", directory / "billing")  # so invoices can be made
    async with guarded_gateway(directory, [(MODEL, "f0", fake.url)]) as g:
        yield g


async def make_side(gw: Gateway, label: str) -> Side:
    tid = f"{label}-{uuid.uuid4().hex[:8]}"
    name = f"{label.title()} Secret Org {uuid.uuid4().hex}"
    gw.tenants.create_tenant(id=tid, name=name, billing_country="DE", currency="USD", tax_id="DE811907980")
    k1, p1 = gw.tenants.create_key(tid, name="one")
    k2, _p2 = gw.tenants.create_key(tid, name="two")
    side = Side(
        tid, name, p1, [k1.id, k2.id], [k1.prefix, k2.prefix], marker=f"{label}-prompt-{uuid.uuid4().hex}"
    )
    r = await gw.http.patch(
        f"/admin/v1/tenants/{tid}/limits",
        headers=ADMIN,
        json={"rpm": 500, "budget": {"unit": "tokens", "amount": 100000}, "content_logging": True},
    )
    assert r.status_code == 200
    for body in (chat(side.marker, max_tokens=4), chat(side.marker, max_tokens=4, stream=True)):
        resp = await gw.http.post("/v1/chat/completions", json=body, headers=bearer(p1))
        assert resp.status_code == 200
        side.request_ids.append(resp.headers["x-request-id"])
    period = {"period": date.today().strftime("%Y-%m"), "tenant": tid}
    run = await gw.http.post("/admin/v1/invoices/run", headers=ADMIN, json=period)
    final = await gw.http.post("/admin/v1/invoices/finalize", headers=ADMIN, json=period)
    if run.status_code < 300 and final.status_code < 300:
        side.invoices = sorted(set(re.findall(r'"number":\s*"([^"]+)"', final.text)))
    return side


def secrets_of(b: Side, sent: set[str]) -> set[str]:
    """What of B must never appear in a response to A (minus what A itself put in the request)."""
    values = {b.name, b.marker, *b.key_ids, *b.prefixes, *b.request_ids, *b.invoices, b.tenant_id}
    return {v for v in values if v and v not in sent}


def tenant_routes(gw: Gateway) -> list[tuple[str, APIRoute]]:
    out: list[tuple[str, APIRoute]] = []
    for route in gw.app.routes:
        if isinstance(route, APIRoute) and not route.path.startswith(OPS):
            out.extend((m, route) for m in sorted(route.methods))
    return out


def path_values(name: str, b: Side) -> list[str]:
    n = name.lower()
    if "tenant" in n or "org" in n:
        return [b.tenant_id]
    if "key" in n:
        return b.key_ids
    if "number" in n or "invoice" in n:
        return b.invoices or [f"INV-{b.tenant_id}"]
    return [b.tenant_id, *b.key_ids, *b.request_ids, *b.invoices]


def request_body(route: APIRoute, b: Side) -> dict[str, Any] | None:
    if "completions" in route.path:
        body: dict[str, Any] = chat("hello from A", max_tokens=4, user=b.tenant_id)
        if route.path.endswith("/v1/completions"):
            body = {"model": MODEL, "prompt": "hello from A", "max_tokens": 4, "user": b.tenant_id}
        return body
    if route.body_field is not None:
        return {"tenant": b.tenant_id, "tenant_id": b.tenant_id, "key_id": b.key_ids[0]}
    return None


async def test_tenant_a_can_never_read_or_change_tenant_b(gw: Gateway, worker: FakeWorker) -> None:
    a = await make_side(gw, "alpha")
    b = await make_side(gw, "bravo")
    b_events = len(gw.events_for(b.tenant_id))
    b_limits = (await gw.http.get(f"/admin/v1/tenants/{b.tenant_id}", headers=ADMIN)).json()
    routes = tenant_routes(gw)
    assert {r.path for _m, r in routes} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    aim_headers = {
        "OpenAI-Organization": b.tenant_id,
        "OpenAI-Project": b.tenant_id,
        "X-Tenant-Id": b.tenant_id,
    }
    problems: list[str] = []
    walked = 0
    for method, route in routes:
        names = re.findall(r"{(\w+)}", route.path)
        combos: list[dict[str, str]] = [{}]
        for n in names:
            combos = [{**c, n: v} for c in combos for v in path_values(n, b)]
        for values in combos:
            path = route.path
            for n, v in values.items():
                path = path.replace("{" + n + "}", v)
            query = {q: b.tenant_id for q in AIM_QUERY}
            for q in route.dependant.query_params:
                if any(w in q.name.lower() for w in ("tenant", "org", "who")):
                    query[q.name] = b.tenant_id
                elif "key" in q.name.lower():
                    query[q.name] = b.key_ids[0]
            body = request_body(route, b)
            r = await gw.http.request(
                method, path, params=query, json=body, headers={**bearer(a.api_key), **aim_headers}
            )
            walked += 1
            sent = set(values.values()) | {b.tenant_id, b.key_ids[0]}
            leaked = [
                s for s in secrets_of(b, sent) if s in r.text or any(s in v for v in r.headers.values())
            ]
            where = f"{method} {path} -> {r.status_code}"
            if r.status_code >= 500:
                problems.append(f"{where}: server error {r.text[:200]}")
            if leaked:
                problems.append(f"{where}: B's {leaked} in the response")
            if values and 200 <= r.status_code < 300:
                problems.append(f"{where}: A reached B's object by id")
    assert walked >= len(routes)
    assert not problems, "\n".join(problems)

    # Nothing of B changed, and everything A did was metered to A.
    after = (await gw.http.get(f"/admin/v1/tenants/{b.tenant_id}", headers=ADMIN)).json()
    assert after == b_limits
    keys = (await gw.http.get(f"/admin/v1/tenants/{b.tenant_id}/keys", headers=ADMIN)).json()["data"]
    assert all(k["revoked_at"] is None for k in keys)
    await asyncio.sleep(0.2)
    assert len(gw.events_for(b.tenant_id)) == b_events
    assert all(e.event.tenant_id == a.tenant_id for e in gw.events_for(a.tenant_id))
    ok = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(b.api_key))
    assert ok.status_code == 200


async def test_the_same_idempotency_key_from_two_tenants_never_crosses(
    gw: Gateway, worker: FakeWorker
) -> None:
    a = await make_side(gw, "alpha")
    b = await make_side(gw, "bravo")
    shared = {"Idempotency-Key": "order-" + uuid.uuid4().hex}
    rb = await gw.http.post(
        "/v1/chat/completions", json=chat(b.marker, max_tokens=4), headers={**bearer(b.api_key), **shared}
    )
    ra = await gw.http.post(
        "/v1/chat/completions", json=chat(b.marker, max_tokens=4), headers={**bearer(a.api_key), **shared}
    )
    assert rb.status_code == 200 and ra.status_code in (200, 409, 422)
    assert ra.headers["x-request-id"] != rb.headers["x-request-id"]
    ev = await gw.wait_event(ra.headers["x-request-id"]) if ra.status_code == 200 else None
    assert ev is None or ev.event.tenant_id == a.tenant_id


async def test_one_tenants_limits_never_throttle_another(gw: Gateway, worker: FakeWorker) -> None:
    a = await make_side(gw, "alpha")
    b = await make_side(gw, "bravo")
    await gw.http.patch(f"/admin/v1/tenants/{b.tenant_id}/limits", headers=ADMIN, json={"rpm": 1})
    await gw.http.post("/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(b.api_key))
    assert (
        await gw.http.post("/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(b.api_key))
    ).status_code == 429
    for _ in range(5):
        r = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(a.api_key))
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "500"


def test_workers_listen_on_loopback_only(tmp_path: Path) -> None:
    """vLLM's /invocations is not guarded by its --api-key: only the gateway may be reachable."""
    from serving.settings import load_settings
    from serving.workers.supervisor import worker_command

    settings = load_settings(REPO / "configs" / "tokenport.yaml", data_dir=tmp_path)
    for model in settings.catalogue.models:
        for w in model.workers:
            if w.launched:
                cmd = worker_command(settings, model, w)
                assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
