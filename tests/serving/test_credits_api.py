"""Prepaid credit through the admin API and the CLI (issue 13): a paid top-up gets a receipt number and
raises the tenant's prepaid money budget in the same transaction, so the budget guard and the invoices
draw on one balance; bad input is a 400 in OpenAI's shape and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.cli import app as cli_app
from tests.conftest import MODEL, Gateway
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error
from tests.serving.limits_support import ADMIN, guarded_gateway


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    d = tmp_path_factory.mktemp("credits")
    shutil.copytree(Path("configs/billing"), d / "billing")  # the issuer's receipt numbering
    async with guarded_gateway(d, [(MODEL, "f0", fake.url)]) as g:
        yield g


def cli(gw: Gateway, *args: str) -> tuple[int, str]:
    env = {
        "TOKENPORT_DATA_DIR": str(gw.settings.data_dir),
        "TOKENPORT_CONFIG": str(Path("configs/tokenport.yaml").resolve()),
    }
    res = CliRunner().invoke(cli_app, list(args), env=env, catch_exceptions=False)
    return res.exit_code, res.output


async def tenant(gw: Gateway) -> str:
    tid = "c-" + uuid.uuid4().hex[:10]
    body = {"id": tid, "name": "Prepaid LLP", "billing_country": "KZ"}
    assert (await gw.http.post("/admin/v1/tenants", json=body, headers=ADMIN)).status_code == 201
    return tid


async def test_a_paid_top_up_gets_a_receipt_and_raises_the_prepaid_budget(gw: Gateway) -> None:
    tid = await tenant(gw)
    prepaid = {"budget": {"unit": "money", "amount": "1", "period": "prepaid"}}
    assert (
        await gw.http.patch(f"/admin/v1/tenants/{tid}/limits", json=prepaid, headers=ADMIN)
    ).status_code == 200
    r = await gw.http.post(
        f"/admin/v1/tenants/{tid}/credits", json={"amount": "50.00", "reference": "wire 7781"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["receipt_number"].startswith("TP-RCP-") and got["prepaid_budget_raised"] is True
    budget = (await gw.http.get(f"/admin/v1/tenants/{tid}/budget", headers=ADMIN)).json()["budget"]
    assert budget["limit"] == "51" or float(budget["limit"]) == 51.0, budget  # the guard's balance
    bal = (await gw.http.get(f"/admin/v1/tenants/{tid}/credits", headers=ADMIN)).json()
    assert (bal["paid"], bal["promotional"], bal["currency"]) == ("50.00", "0", "USD")
    audit = (await gw.http.get("/admin/v1/audit", params={"tenant_id": tid}, headers=ADMIN)).json()
    assert any(e["action"] == "credits.add" for e in audit["data"]), audit
    number = got["receipt_number"]
    pdf = await gw.http.get(f"/admin/v1/credits/receipts/{number}", params={"format": "pdf"}, headers=ADMIN)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    missing = await gw.http.get("/admin/v1/credits/receipts/TP-RCP-1999-000001", headers=ADMIN)
    assert_openai_error(missing, 404)
    bad = await gw.http.get(f"/admin/v1/credits/receipts/{number}", params={"format": "ubl"}, headers=ADMIN)
    assert_openai_error(bad, 400)


async def test_promotional_credit_from_the_cli_is_kept_apart(gw: Gateway) -> None:
    tid = await tenant(gw)
    code, out = cli(
        gw, "credits", "add", tid, "--amount", "12.50", "--kind", "promotional", "--reference", "launch",
        "--expires-on", "2099-12-31", "--json",
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["receipt_number"] is None  # no receipt: nothing was paid
    code, out = cli(gw, "credits", "balance", tid, "--json")
    got = json.loads(out)
    assert (got["promotional"], got["paid"], got["total"]) == ("12.50", "0", "12.50")
    code, out = cli(gw, "credits", "add", tid, "--amount", "40", "--reference", "wire 1", "--json")
    number = json.loads(out)["receipt_number"]
    target = gw.settings.data_dir / "receipt.html"
    code, out = cli(gw, "credits", "receipt", number, "--format", "html", "--out", str(target))
    assert code == 0 and number in target.read_text("utf-8")


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"amount": "10.001", "reference": "x"}, 400, "more decimals than USD"),
        (
            {"amount": "10", "reference": "x", "kind": "paid", "expires_on": "2099-01-01"},
            400,
            "does not expire",
        ),
        ({"amount": "10", "reference": "x", "kind": "gift"}, 400, ""),
        ({"amount": "10"}, 400, ""),
        ({"amount": "-1", "reference": "x"}, 400, ""),
    ],
)
async def test_bad_credits_are_refused_in_openai_shape(
    gw: Gateway, body: dict[str, str], status: int, reason: str
) -> None:
    tid = await tenant(gw)
    r = await gw.http.post(f"/admin/v1/tenants/{tid}/credits", json=body, headers=ADMIN)
    assert_openai_error(r, status)
    assert reason in r.json()["error"]["message"]
    bal = (await gw.http.get(f"/admin/v1/tenants/{tid}/credits", headers=ADMIN)).json()
    assert bal["ledger"] == []


async def test_credit_for_an_unknown_tenant_is_404(gw: Gateway) -> None:
    r = await gw.http.post(
        "/admin/v1/tenants/nobody-here/credits", json={"amount": "1", "reference": "x"}, headers=ADMIN
    )
    assert_openai_error(r, 404)
    code, out = cli(gw, "credits", "add", "nobody-here", "--amount", "1", "--reference", "x")
    assert code == 1 and "nobody-here" in out
