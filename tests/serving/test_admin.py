"""The admin API and CLI: admin credential, tenants and keys, key handling, and the audit log."""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from typer.testing import CliRunner

from metering.tenants import hash_key
from serving.cli import app as cli_app
from tests.conftest import MODEL, Gateway
from tests.fakes import FakeWorker
from tests.serving.limits_support import ADMIN, bearer, chat, guarded_gateway

PARAMS = {"tenant_id": "t-nobody", "key_id": "key_000000000000"}


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with guarded_gateway(tmp_path_factory.mktemp("admin-gw"), [(MODEL, "f0", fake.url)]) as g:
        yield g


def admin_routes(gw: Gateway) -> list[tuple[str, str]]:
    out = []
    for route in gw.app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/admin"):
            for method in sorted(route.methods):
                out.append((method, re.sub(r"{(\w+)}", lambda m: PARAMS.get(m.group(1), "x"), route.path)))
    return out


async def test_every_admin_route_needs_the_admin_credential(gw: Gateway) -> None:
    _t, _k, tenant_key = gw.new_tenant()
    routes = admin_routes(gw)
    assert len(routes) >= 12
    for method, path in routes:
        for headers in (
            {},
            bearer(tenant_key),
            {"Authorization": "Bearer local-admin-tokenX"},
            {"Authorization": "Basic local-admin-token"},
        ):
            r = await gw.http.request(method, path, headers=headers, json={})
            assert r.status_code in (400, 401), (method, path, r.text)  # 400: FastAPI checks the body first
            if r.status_code == 401:
                assert r.json()["error"]["code"] == "invalid_admin_token"
        r = await gw.http.request(method, path, headers=bearer(tenant_key))
        assert r.status_code == 401, (method, path)


async def test_tenant_and_key_lifecycle_through_the_admin_api_is_audited(
    gw: Gateway, worker: FakeWorker
) -> None:
    tid = "acme-" + datetime.now(UTC).strftime("%H%M%S%f")
    body = {
        "id": tid,
        "name": "Acme Trading",
        "billing_country": "AE",
        "currency": "USD",
        "tax_id": "100123456700003",
    }
    r = await gw.http.post("/admin/v1/tenants", json=body, headers=ADMIN)
    assert r.status_code == 201 and r.json()["id"] == tid and r.json()["limits"]["budget"] is None
    assert (await gw.http.post("/admin/v1/tenants", json=body, headers=ADMIN)).status_code == 409
    bad = await gw.http.post(
        "/admin/v1/tenants", json={**body, "id": tid + "x", "billing_country": "XX"}, headers=ADMIN
    )
    assert bad.status_code == 400 and "XX" in bad.json()["error"]["message"]

    created = await gw.http.post(f"/admin/v1/tenants/{tid}/keys", json={"name": "prod"}, headers=ADMIN)
    assert created.status_code == 201
    key = created.json()
    plaintext = key["key"]
    assert re.fullmatch(r"tp_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", plaintext)  # 256 random bits after the id
    assert key["prefix"] == plaintext[:15] == "tp_" + key["id"][4:]
    ok = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(plaintext))
    assert ok.status_code == 200  # usable at once

    # Shown once: no later response, no audit row and no database row holds the plaintext.
    listed = await gw.http.get(f"/admin/v1/tenants/{tid}/keys", headers=ADMIN)
    one = await gw.http.get(f"/admin/v1/keys/{key['id']}", headers=ADMIN)
    audit = await gw.http.get("/admin/v1/audit", params={"tenant_id": tid}, headers=ADMIN)
    for resp in (listed, one, audit):
        assert plaintext not in resp.text and plaintext[15:] not in resp.text
    db = Path(gw.settings.db_url.removeprefix("sqlite:///"))
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert plaintext.encode() not in raw and plaintext[15:].encode() not in raw
    stored = gw.tenants.lookup(hash_key(gw.settings.secret_key, plaintext))
    assert stored is not None and stored[0].id == key["id"]  # stored as HMAC(secret, key)

    revoked = await gw.http.post(f"/admin/v1/keys/{key['id']}/revoke", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = await gw.http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=bearer(plaintext))
    assert refused.status_code == 401

    rows = (await gw.http.get("/admin/v1/audit", params={"tenant_id": tid}, headers=ADMIN)).json()["data"]
    actions = [(e["action"], e["outcome"]) for e in rows]
    assert (
        actions[:3] == [("key.revoke", "ok"), ("key.create", "ok"), ("tenant.create", "error")]
        or ("tenant.create", "ok") in actions
    )
    create = next(e for e in rows if e["action"] == "key.create")
    assert create["actor"] == "admin" and create["source"] == "api" and create["client"] == "127.0.0.1"
    assert create["target"] == key["id"] and create["detail"]["prefix"] == key["prefix"]
    assert datetime.fromisoformat(create["at"]) > datetime.now(UTC) - timedelta(minutes=1)
    assert ("tenant.create", "error") in actions  # the duplicate attempt is on record too


async def test_limits_api_validates_and_audits(gw: Gateway) -> None:
    t, key, _api_key = gw.new_tenant()
    for body in (
        {"rpm": 0},
        {"budget": {"unit": "tokens", "amount": 0.5}},
        {"budget": {"unit": "gold", "amount": 1}},
        {"budget": {"unit": "money", "amount": "-1"}},
        {"budget": {"unit": "tokens", "amount": "1.5"}},
        {"content_logging": "maybe"},
        {"nope": 1},
    ):
        r = await gw.http.patch(f"/admin/v1/tenants/{t.id}/limits", json=body, headers=ADMIN)
        assert r.status_code == 400, (body, r.text)
    r = await gw.http.patch(
        f"/admin/v1/tenants/{t.id}/limits",
        headers=ADMIN,
        json={"rpm": 60, "budget": {"unit": "money", "amount": "12.50"}, "max_tokens": 512},
    )
    assert r.status_code == 200
    limits = r.json()["limits"]
    assert limits["rpm"] == 60 and limits["budget"] == {
        "unit": "money",
        "amount": "12.50",
        "period": "month",
        "since": None,
    }
    r = await gw.http.patch(f"/admin/v1/tenants/{t.id}/limits", json={"rpm": None}, headers=ADMIN)
    assert r.json()["limits"]["rpm"] is None and r.json()["limits"]["max_tokens"] == 512  # only what was sent
    k = await gw.http.patch(f"/admin/v1/keys/{key.id}/limits", json={"content_logging": True}, headers=ADMIN)
    assert k.status_code == 400  # a tenant setting
    assert (await gw.http.get("/admin/v1/tenants/t-missing", headers=ADMIN)).status_code == 404
    assert (await gw.http.get("/admin/v1/keys/key_0123456789ab", headers=ADMIN)).status_code == 404
    b = (await gw.http.get(f"/admin/v1/tenants/{t.id}/budget", headers=ADMIN)).json()["budget"]
    assert b["unit"] == "USD" and b["limit"] == "12.5" and b["used"] == "0"
    rows = (
        await gw.http.get(
            "/admin/v1/audit", params={"tenant_id": t.id, "action": "tenant.limits"}, headers=ADMIN
        )
    ).json()["data"]
    assert [e["outcome"] for e in rows].count("ok") == 2 and rows[0]["detail"] == {"rpm": None}


async def test_key_expiry_and_revocation_across_gateway_processes(
    fake: FakeWorker, worker: FakeWorker, tmp_path: Path
) -> None:
    env = {"TOKENPORT_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}"}
    async with (
        guarded_gateway(tmp_path / "a", [(MODEL, "f0", fake.url)], env=env) as a,
        guarded_gateway(tmp_path / "b", [(MODEL, "f0", fake.url)], env=env) as b,
    ):
        t, key, api_key = a.new_tenant()
        for g in (a, b):
            assert (
                await g.http.post("/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(api_key))
            ).status_code == 200
        assert (await a.http.post(f"/admin/v1/keys/{key.id}/revoke", headers=ADMIN)).status_code == 200
        await asyncio.sleep(0.5)  # gateway b reloads within key_cache_refresh_s (0.25 s)
        r = await b.http.post("/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(api_key))
        assert (r.status_code == 401 and "revoked" in r.json()["error"]["message"]) or r.status_code == 401

        soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
        past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        assert (
            await a.http.post(f"/admin/v1/tenants/{t.id}/keys", json={"expires_at": past}, headers=ADMIN)
        ).status_code == 400
        short = (
            await a.http.post(f"/admin/v1/tenants/{t.id}/keys", json={"expires_at": soon}, headers=ADMIN)
        ).json()
        assert (
            await b.http.post("/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(short["key"]))
        ).status_code == 200
        await asyncio.sleep(
            max(0.0, (datetime.fromisoformat(soon) - datetime.now(UTC)).total_seconds()) + 0.1
        )
        for g in (a, b):
            r = await g.http.post(
                "/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(short["key"])
            )
            assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


async def test_only_well_formed_unknown_keys_are_looked_up_in_the_database() -> None:
    """Unknown keys are refused from the in-memory cache; only a key shaped like ours costs a database
    read."""
    from serving.auth import KeyRing
    from serving.errors import AuthenticationFailed

    class Store:
        lookups = 0

        def lookup(self, _digest: str) -> None:
            Store.lookups += 1

    ring = KeyRing(Store(), "secret", 0.25)  # type: ignore[arg-type]
    for bad in (
        "x" * 5000,
        "tp_zzzz",
        "sk-" + "a" * 48,
        "tp_0123456789ab_" + "a" * 42 + "!",
        "tp_0123456789ab_" + "a" * 44,
    ):
        with pytest.raises(AuthenticationFailed):
            await ring.authenticate("Bearer " + bad)
    assert Store.lookups == 0
    with pytest.raises(AuthenticationFailed):
        await ring.authenticate("Bearer tp_0123456789ab_" + "a" * 43)
    assert Store.lookups == 1


def test_cli_changes_are_audited_with_the_os_user_and_host(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {
        "TOKENPORT_DATA_DIR": str(tmp_path),
        "TOKENPORT_CONFIG": str(Path("configs/tokenport.yaml").resolve()),
    }

    def run(*args: str) -> str:
        res = runner.invoke(cli_app, list(args), env=env, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    run("tenants", "create", "--id", "cli-t", "--name", "CLI Tenant", "--billing-country", "KZ")
    key = json.loads(run("keys", "create", "--tenant", "cli-t", "--json"))
    run("tenants", "set-limits", "cli-t", "--rpm", "30", "--budget", "1000", "--models", MODEL)
    run("keys", "set-limits", key["id"], "--tpm", "5000")
    run("keys", "revoke", key["id"])
    limits = json.loads(run("tenants", "limits", "cli-t", "--json"))
    assert limits["limits"]["rpm"] == 30 and limits["allowed_models"] == [MODEL]
    assert limits["budget_use"] == {
        "since": limits["budget_use"]["since"],
        "used": "0",
        "limit": "1000",
        "unit": "tokens",
    }
    rows = json.loads(run("admin", "audit", "--tenant", "cli-t", "--json"))
    assert [e["action"] for e in rows] == [
        "key.revoke",
        "key.limits",
        "tenant.models",
        "tenant.limits",
        "key.create",
        "tenant.create",
    ]
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = "unknown"
    assert {(e["actor"], e["source"], e["client"]) for e in rows} == {(user, "cli", socket.gethostname())}
    assert key["key"] not in json.dumps(rows)
    bad = runner.invoke(
        cli_app, ["tenants", "set-limits", "cli-t", "--budget", "1", "--budget-unit", "gold"], env=env
    )
    assert bad.exit_code == 2


def test_the_cli_does_not_import_the_http_packages() -> None:
    """The CLI shares the application services (serving/services.py, accounts.py, audit.py), not the
    routers."""
    import subprocess
    import sys

    code = (
        "import sys, serving.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'starlette') or m.startswith(('serving.admin', 'serving.tenant', 'serving.deps', "
        "'serving.app'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_key_expiry_out_of_range_is_an_error_not_a_crash(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {
        "TOKENPORT_DATA_DIR": str(tmp_path),
        "TOKENPORT_CONFIG": str(Path("configs/tokenport.yaml").resolve()),
    }
    ok = runner.invoke(
        cli_app, ["tenants", "create", "--id", "exp-t", "--name", "E", "--billing-country", "KZ"], env=env
    )
    assert ok.exit_code == 0, ok.output
    res = runner.invoke(
        cli_app, ["keys", "create", "--tenant", "exp-t", "--expires-in-days", str(10**9)], env=env
    )
    assert res.exit_code == 2 and "out of range" in res.output
