"""GET /v1/usage (a tenant's own usage, grouped), /v1/usage/events (with hashes a tenant can check),
GET /admin/v1/usage and /admin/v1/usage/events (every tenant, paged, admin credential)."""

from __future__ import annotations

import openai

from metering.verify import verify_event_rows
from tests.conftest import MODEL, Gateway, TenantKey
from tests.fakes import FakeWorker
from tests.serving.helpers import auth, chat_body

ADMIN = {"Authorization": "Bearer local-admin-token"}


async def _traffic(gateway: Gateway, api_key: str, n: int, country: str) -> list[str]:
    ids = []
    for i in range(n):
        r = await gateway.http.post(
            "/v1/chat/completions",
            json=chat_body(f"Hello number {i}, how are you?"),
            headers=auth(api_key, **{"X-Client-Country": country}),
        )
        assert r.status_code == 200
        ids.append(r.headers["x-request-id"])
    for rid in ids:
        await gateway.wait_event(rid)
    return ids


async def test_tenant_sees_only_its_own_usage_grouped(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    worker.behave(tokens=3, prompt_tokens=11)
    await _traffic(gateway, tenant.api_key, 2, "UZ")
    await _traffic(gateway, tenant.api_key, 1, "KZ")
    _t, _k, other = gateway.new_tenant()
    await _traffic(gateway, other, 2, "UZ")
    r = await gateway.http.get(
        "/v1/usage", params={"group_by": "model,origin_country,language"}, headers=auth(tenant.api_key)
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant_id"] == tenant.tenant.id
    rows = {(d["model"], d["origin_country"], d["language"]): d for d in body["data"]}
    assert set(rows) == {(MODEL, "KZ", "en"), (MODEL, "UZ", "en")}
    assert rows[(MODEL, "UZ", "en")]["requests"] == 2 and rows[(MODEL, "UZ", "en")]["completion_tokens"] == 6
    assert body["totals"] == {
        "requests": 3,
        "prompt_tokens": 33,
        "cached_prompt_tokens": 0,
        "completion_tokens": 9,
        "input_tokens": 33,
        "total_tokens": 42,
    }
    future = await gateway.http.get("/v1/usage", params={"start": "2999-01-01"}, headers=auth(tenant.api_key))
    assert future.json()["totals"]["requests"] == 0


async def test_usage_api_errors(gateway: Gateway, tenant: TenantKey) -> None:
    r = await gateway.http.get("/v1/usage", params={"group_by": "tenant_id"}, headers=auth(tenant.api_key))
    assert r.status_code == 400 and r.json()["error"]["param"] == "group_by"
    r = await gateway.http.get("/v1/usage", params={"start": "yesterday"}, headers=auth(tenant.api_key))
    assert r.status_code == 400 and r.json()["error"]["param"] == "start"
    r = await gateway.http.get(
        "/v1/usage", params={"start": "2026-02-01", "end": "2026-01-01"}, headers=auth(tenant.api_key)
    )
    assert r.status_code == 400
    assert (await gateway.http.get("/v1/usage")).status_code == 401
    assert (await gateway.http.get("/admin/v1/usage", headers=auth(tenant.api_key))).status_code == 401


async def test_events_download_verifies_without_trusting_us(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    ids = await _traffic(gateway, tenant.api_key, 3, "UZ")
    rows = []
    after = 0
    while True:
        page = (
            await gateway.http.get(
                "/v1/usage/events", params={"after": after, "limit": 2}, headers=auth(tenant.api_key)
            )
        ).json()
        rows.extend(page["data"])
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert [r["request_id"] for r in rows] == ids
    assert {r["tenant_id"] for r in rows} == {tenant.tenant.id}
    report = verify_event_rows(rows)
    assert report.ok and report.completion_tokens == sum(r["completion_tokens"] for r in rows)
    rows[0]["prompt_tokens"] += 1
    assert not verify_event_rows(rows).ok


async def test_admin_usage_pages_through_every_tenant(gateway: Gateway, worker: FakeWorker) -> None:
    made = []
    for _ in range(3):
        t, _k, api_key = gateway.new_tenant()
        await _traffic(gateway, api_key, 1, "UZ")
        made.append(t.id)
    seen: list[str] = []
    offset = 0
    while True:
        r = await gateway.http.get(
            "/admin/v1/usage", params={"group_by": "tenant", "limit": 2, "offset": offset}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        body = r.json()
        seen.extend(d["tenant_id"] for d in body["data"])
        if not body["has_more"]:
            break
        offset = body["next_offset"]
    assert set(made) <= set(seen) and len(seen) == len(set(seen))
    one = (
        await gateway.http.get(
            "/admin/v1/usage", params={"tenant": made[0], "group_by": "model,worker"}, headers=ADMIN
        )
    ).json()
    assert [d["requests"] for d in one["data"]] == [1] and one["data"][0]["worker_id"]
    ev = (await gateway.http.get("/admin/v1/usage/events", params={"tenant": made[1]}, headers=ADMIN)).json()
    assert [e["tenant_id"] for e in ev["data"]] == [made[1]] and ev["chain_head"]["seq"] >= ev["data"][0][
        "seq"
    ]


async def test_openai_client_traffic_shows_up(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    r = await gateway.http.get("/v1/usage", params={"group_by": "outcome"}, headers=auth(tenant.api_key))
    assert r.json()["data"][0]["outcome"] == "ok"
