"""Tenant edit (issue 13): `tokenport tenants update` and `PATCH /admin/v1/tenants/{id}`, audited, and
one validation of tax id, currency and language on every write path (CLI and admin API, create and
update): what one refuses, the other refuses with the same message."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from serving.cli import app as cli_app
from tests.conftest import MODEL, Gateway
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error
from tests.serving.limits_support import ADMIN, guarded_gateway

BAD = [
    ({"billing_country": "KZ", "tax_id": "123456789012"}, "check digit"),  # a BIN failing its check digit
    ({"billing_country": "KZ", "currency": "KZT"}, "no price book"),  # nothing could be invoiced in it
    ({"billing_country": "KZ", "language": "xx"}, "not a document language"),
]


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with guarded_gateway(tmp_path_factory.mktemp("edit"), [(MODEL, "f0", fake.url)]) as g:
        yield g


def cli(gw: Gateway, *args: str) -> tuple[int, str]:
    env = {
        "TOKENPORT_DATA_DIR": str(gw.settings.data_dir),
        "TOKENPORT_CONFIG": str(Path("configs/tokenport.yaml").resolve()),
    }
    res = CliRunner().invoke(cli_app, list(args), env=env, catch_exceptions=False)
    return res.exit_code, res.output


def flags(fields: dict[str, Any]) -> list[str]:
    return [x for k, v in fields.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize(("fields", "reason"), BAD)
async def test_create_refuses_the_same_on_the_cli_and_the_admin_api(
    gw: Gateway, fields: dict[str, Any], reason: str
) -> None:
    tid = "v-" + uuid.uuid4().hex[:10]
    r = await gw.http.post("/admin/v1/tenants", json={"id": tid, "name": "V LLP", **fields}, headers=ADMIN)
    assert_openai_error(r, 400)
    api_message = r.json()["error"]["message"]
    assert reason in api_message
    code, out = cli(gw, "tenants", "create", "--id", tid, "--name", "V LLP", *flags(fields))
    assert code != 0 and reason in " ".join(out.split())
    assert (await gw.http.get(f"/admin/v1/tenants/{tid}", headers=ADMIN)).status_code == 404


async def test_patch_edits_a_tenant_audited_and_validated(gw: Gateway) -> None:
    tid = "e-" + uuid.uuid4().hex[:10]
    created = await gw.http.post(
        "/admin/v1/tenants",
        json={"id": tid, "name": "Wrong Name LLP", "billing_country": "KZ"},
        headers=ADMIN,
    )
    assert created.status_code == 201
    r = await gw.http.patch(
        f"/admin/v1/tenants/{tid}",
        json={"name": "Almaty Trade LLP", "tax_id": "123456789013", "language": "kk"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["name"], got["tax_id"], got["language"], got["billing_country"]) == (
        "Almaty Trade LLP",
        "123456789013",
        "kk",
        "KZ",
    )
    for fields, reason in BAD:
        bad = await gw.http.patch(f"/admin/v1/tenants/{tid}", json=fields, headers=ADMIN)
        assert_openai_error(bad, 400)
        assert reason in bad.json()["error"]["message"]
    # a new country re-checks the tax id already stored
    moved = await gw.http.patch(f"/admin/v1/tenants/{tid}", json={"billing_country": "UZ"}, headers=ADMIN)
    assert_openai_error(moved, 400)
    assert_openai_error(
        await gw.http.patch(f"/admin/v1/tenants/{tid}", json={"colour": "red"}, headers=ADMIN), 400
    )
    assert_openai_error(await gw.http.patch(f"/admin/v1/tenants/{tid}", json={}, headers=ADMIN), 400)
    assert_openai_error(
        await gw.http.patch(f"/admin/v1/tenants/{tid}", json={"name": None}, headers=ADMIN), 400
    )
    assert_openai_error(
        await gw.http.patch("/admin/v1/tenants/nobody", json={"name": "X"}, headers=ADMIN), 404
    )
    audit = (await gw.http.get("/admin/v1/audit", params={"tenant_id": tid}, headers=ADMIN)).json()["data"]
    edits = [e for e in audit if e["action"] == "tenant.update"]
    assert edits and edits[-1]["outcome"] == "ok"
    assert edits[-1]["detail"]["before"]["name"] == "Wrong Name LLP"


async def test_the_cli_updates_a_tenant(gw: Gateway) -> None:
    tid = "c-" + uuid.uuid4().hex[:10]
    code, out = cli(gw, "tenants", "create", "--id", tid, "--name", "C LLP", "--billing-country", "KZ")
    assert code == 0, out
    code, out = cli(gw, "tenants", "update", tid, "--name", "C Trade LLP", "--language", "ru", "--json")
    assert code == 0, out
    assert json.loads(out)["name"] == "C Trade LLP" and json.loads(out)["language"] == "ru"
    code, out = cli(gw, "tenants", "update", tid, "--currency", "KZT")
    assert code != 0 and "no price book" in out
    code, out = cli(gw, "tenants", "update", tid)
    assert code != 0 and "nothing to change" in out


async def test_a_money_budget_blocks_a_currency_change_until_it_is_removed(gw: Gateway) -> None:
    tid = "m-" + uuid.uuid4().hex[:10]
    body = {"id": tid, "name": "Money LLP", "billing_country": "KZ"}
    assert (await gw.http.post("/admin/v1/tenants", json=body, headers=ADMIN)).status_code == 201
    key = (await gw.http.post(f"/admin/v1/tenants/{tid}/keys", json={}, headers=ADMIN)).json()["id"]
    money = {"budget": {"unit": "money", "amount": "100", "period": "month"}}
    r = await gw.http.patch(f"/admin/v1/keys/{key}/limits", json=money, headers=ADMIN)
    assert r.status_code == 200, r.text
    r = await gw.http.patch(f"/admin/v1/tenants/{tid}", json={"currency": "CNY"}, headers=ADMIN)
    assert_openai_error(r, 400)
    assert f"key {key} has a money budget in USD" in r.json()["error"]["message"]
    code, out = cli(gw, "tenants", "update", tid, "--currency", "CNY")
    assert code != 0 and "money budget" in " ".join(out.split())
    assert (await gw.http.get(f"/admin/v1/tenants/{tid}", headers=ADMIN)).json()["currency"] == "USD"
    tokens = {"budget": {"unit": "tokens", "amount": "1000", "period": "month"}}
    assert (
        await gw.http.patch(f"/admin/v1/keys/{key}/limits", json=tokens, headers=ADMIN)
    ).status_code == 200
    r = await gw.http.patch(f"/admin/v1/tenants/{tid}", json={"currency": "CNY"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["currency"] == "CNY", r.text  # a token budget has no currency
