"""The billing HTTP API through the real app: create_app(settings) with its lifespan, spoken to with
httpx's ASGITransport. The catalogue's only worker is unreachable (billing routes do not need one).

Admin routes (/admin/v1/invoices, /admin/v1/reports) need the admin token; GET /v1/invoices needs a
tenant key and shows that tenant's issued documents only.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from serving import db_schema
from serving.app import create_app
from serving.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
ADMIN = {"Authorization": "Bearer local-admin-token"}
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Api:
    http: httpx.AsyncClient
    keys: dict[str, str]

    async def admin(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return await self.http.request(method, url, headers=ADMIN, **kw)

    async def tenant(self, tenant: str, url: str) -> httpx.Response:
        return await self.http.get(url, headers={"Authorization": f"Bearer {self.keys[tenant]}"})


def openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


@pytest.fixture()
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    shutil.copytree(ROOT / "configs" / "billing", tmp_path / "billing")
    (tmp_path / "models.yaml").write_text(
        yaml.safe_dump(
            {
                "default_model": MODEL,
                "models": [
                    {
                        "name": MODEL,
                        "workers": [{"id": "w0", "base_url": "http://127.0.0.1:9", "region": "nowhere"}],
                    }
                ],
            }
        )
    )
    # no metrics listener: port 9464 may be taken on a shared test machine
    (tmp_path / "tokenport.yaml").write_text(
        yaml.safe_dump(
            {
                "mode": "local",
                "data_dir": str(tmp_path / "data"),
                "models_file": "models.yaml",
                "gateway": {"metrics_port": None},
            }
        )
    )
    settings = load_settings(config_file=tmp_path / "tokenport.yaml")
    engine = make_engine(settings.db_url)
    db_schema.upgrade(engine)
    tenants = TenantStore(engine, settings.secret_key)
    keys: dict[str, str] = {}
    for tid, country, tax_id in (("kz-a", "KZ", "123456789013"), ("kz-b", "KZ", "987654321010")):
        tenants.create_tenant(id=tid, name=f"Tenant {tid}", billing_country=country, tax_id=tax_id)
        keys[tid] = tenants.create_key(tid)[1]
    when = datetime(2026, 1, 8, 9, tzinfo=UTC)
    UsageStore(engine).append_batch(
        [
            UsageEvent(
                request_id="req_" + uuid.uuid4().hex,
                tenant_id=t,
                key_id="key_api",
                model=MODEL,
                origin_country=o,
                prompt_tokens=p,
                cached_prompt_tokens=0,
                completion_tokens=c,
                stream=False,
                outcome=Outcome.OK,
                started_at=when,
                finished_at=when,
                language="en",
            )
            for t, o, p, c in (("kz-a", "KZ", 10_000_000, 5_000_000), ("kz-b", "UZ", 20_000_000, 1_000_000))
        ]
    )
    engine.dispose()
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as http:
            yield Api(http, keys)


async def test_admin_month_close_over_http(api: Api) -> None:
    openai_error(await api.http.post("/admin/v1/invoices/run", json={"period": "2026-01"}), 401)
    openai_error(await api.http.get("/admin/v1/invoices", headers={"Authorization": "Bearer nope"}), 401)
    openai_error(await api.http.get("/admin/v1/reports/exports?period=2026-01"), 401)
    openai_error(await api.admin("POST", "/admin/v1/invoices/run", json={"period": "2026-1"}), 400)
    openai_error(
        await api.admin("POST", "/admin/v1/invoices/finalize", json={"period": "2026-01"}),
        409,
        "invoice_state",
    )  # not run yet

    run = await api.admin("POST", "/admin/v1/invoices/run", json={"period": "2026-01"})
    assert run.status_code == 200, run.text
    assert [d["ref"] for d in run.json()["drafts"]] == ["DRAFT-2026-01-kz-a", "DRAFT-2026-01-kz-b"]
    fin = await api.admin("POST", "/admin/v1/invoices/finalize", json={"period": "2026-01"})
    assert fin.status_code == 200, fin.text
    numbers = {d["tenant"]: d["number"] for d in fin.json()["finalized"]}
    assert numbers == {"kz-a": "TP-INV-2026-000001", "kz-b": "TP-INV-2026-000002"}

    listed = (await api.admin("GET", "/admin/v1/invoices?period=2026-01&status=finalized")).json()
    assert [(d["number"], d["tenant"], d["total"]) for d in listed["data"]] == [
        ("TP-INV-2026-000001", "kz-a", "0.40"),
        ("TP-INV-2026-000002", "kz-b", "0.44"),
    ]
    doc = await api.admin("GET", "/admin/v1/invoices/TP-INV-2026-000001")
    assert doc.headers["content-type"] == "application/json" and doc.json()["status"] == "finalized"
    pdf = await api.admin("GET", "/admin/v1/invoices/TP-INV-2026-000001?format=pdf")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF-")
    assert (await api.admin("GET", "/admin/v1/invoices/TP-INV-2026-000001?format=ubl")).text.startswith(
        "<?xml"
    )
    openai_error(await api.admin("GET", "/admin/v1/invoices/TP-INV-2026-000001?format=docx"), 400)
    openai_error(await api.admin("GET", "/admin/v1/invoices/TP-INV-2030-000001"), 404, "invoice_not_found")
    verify = (await api.admin("GET", "/admin/v1/invoices/TP-INV-2026-000002/verify")).json()
    assert verify == {"number": "TP-INV-2026-000002", "ok": True, "events": 1, "problems": []}

    void = await api.admin(
        "POST", "/admin/v1/invoices/TP-INV-2026-000002/void", json={"reason": "test order"}
    )
    assert void.status_code == 200, void.text
    assert void.json()["credit_note"]["number"] == "TP-CRN-2026-000001"
    openai_error(
        await api.admin("POST", "/admin/v1/invoices/TP-INV-2026-000002/void", json={"reason": "again"}),
        409,
        "invoice_state",
    )
    report = (await api.admin("GET", "/admin/v1/reports/exports?period=2026-01&by=tenant")).json()
    assert {g["key"]: (g["quantity_tokens"], g["revenue_by_currency"]) for g in report["groups"]} == {
        "kz-a": (15_000_000, {"USD": "0.40"}),
        "kz-b": (0, {"USD": "0.00"}),
    }
    csv = await api.admin("GET", "/admin/v1/reports/exports?period=2026-01&by=country&format=csv")
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.startswith("country,")
    openai_error(await api.admin("GET", "/admin/v1/reports/exports?period=2026-01&by=planet"), 400)

    audit = (await api.admin("GET", "/admin/v1/audit?action=invoices.finalize")).json()["data"]
    assert audit and audit[0]["detail"]["numbers"] == ["TP-INV-2026-000001", "TP-INV-2026-000002"]

    # receivables and partial credit notes over HTTP
    part = await api.admin(
        "POST",
        "/admin/v1/invoices/TP-INV-2026-000001/credit-notes",
        json={"reason": "goodwill", "amount": "0.10"},
    )
    assert part.status_code == 201, part.text
    assert part.json()["credit_note"]["number"] == "TP-CRN-2026-000002"
    status = (await api.admin("GET", "/admin/v1/invoices/TP-INV-2026-000001/status")).json()
    assert status["status"] == "open" and status["credited"] == "0.10"
    paid = await api.admin(
        "POST",
        "/admin/v1/invoices/TP-INV-2026-000001/payments",
        json={"amount": status["outstanding"], "date": "2026-02-03", "reference": "SWIFT-9"},
    )
    assert paid.status_code == 201 and paid.json()["status"] == "paid", paid.text
    openai_error(
        await api.admin(
            "POST",
            "/admin/v1/invoices/TP-INV-2026-000001/payments",
            json={"amount": "1", "date": "2026-02-04", "reference": "again"},
        ),
        409,
    )
    openai_error(
        await api.admin(
            "POST", "/admin/v1/invoices/TP-INV-2026-000001/payments", json={"amount": "-1", "date": "x"}
        ),
        400,
    )
    aging = (await api.admin("GET", "/admin/v1/invoices/aging?as_of=2026-06-01")).json()
    assert aging["object"] == "aging" and all(r["tenant"] != "kz-a" for r in aging["data"])


async def test_tenants_see_only_their_own_issued_documents(api: Api) -> None:
    openai_error(await api.http.get("/v1/invoices"), 401)
    assert (await api.tenant("kz-a", "/v1/invoices")).json() == {"object": "list", "data": []}
    await api.admin("POST", "/admin/v1/invoices/run", json={"period": "2026-01"})
    assert (await api.tenant("kz-a", "/v1/invoices")).json()["data"] == []  # drafts are not shown
    openai_error(await api.tenant("kz-a", "/v1/invoices/DRAFT-2026-01-kz-a"), 404)
    await api.admin("POST", "/admin/v1/invoices/finalize", json={"period": "2026-01"})
    await api.admin("POST", "/admin/v1/invoices/TP-INV-2026-000001/void", json={"reason": "re-issue"})

    mine = (await api.tenant("kz-a", "/v1/invoices")).json()["data"]
    assert [(d["number"], d["kind"], d["status"]) for d in mine] == [
        ("TP-INV-2026-000001", "invoice", "void"),
        ("TP-CRN-2026-000001", "credit_note", "finalized"),
    ]
    assert all("tenant" not in d and "error" not in d for d in mine)
    theirs = (await api.tenant("kz-b", "/v1/invoices?period=2026-01")).json()["data"]
    assert [d["number"] for d in theirs] == ["TP-INV-2026-000002"]

    own = await api.tenant("kz-b", "/v1/invoices/TP-INV-2026-000002")
    assert own.status_code == 200 and own.json()["buyer"]["id"] == "kz-b"
    pdf = await api.tenant("kz-b", "/v1/invoices/TP-INV-2026-000002?format=pdf")
    assert pdf.content.startswith(b"%PDF-")
    for other in ("TP-INV-2026-000001", "TP-CRN-2026-000001"):
        err = openai_error(await api.tenant("kz-b", f"/v1/invoices/{other}"), 404, "invoice_not_found")
        assert "kz-a" not in json.dumps(err)
    assert (await api.tenant("kz-a", "/v1/invoices/TP-CRN-2026-000001")).json()[
        "original_number"
    ] == "TP-INV-2026-000001"
