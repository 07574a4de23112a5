"""Traffic in several languages shows up in the tenant's and the admin's languages report (characters,
tokens per 1,000 characters, premium against English) and in the characters counter."""

from __future__ import annotations

from decimal import Decimal

from metering.clock import Period, utcnow
from tests.conftest import MODEL, Gateway, TenantKey, metric
from tests.fakes import FakeWorker
from tests.serving.helpers import auth, chat_body
from tests.serving.limits_support import ADMIN

PROMPTS = {
    "en": "How much does it cost to ship one container from Almaty to Tianjin this month?",
    "kk": "Осы айда Алматыдан Тяньцзиньге бір контейнер жіберу қанша тұрады?",
    "ru": "Сколько стоит отправить один контейнер из Алматы в Тяньцзинь в этом месяце?",
}


async def test_languages_report_from_real_traffic(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    worker.behave(tokens=3, prompt_tokens=31)  # every answer: " w0 w1 w2" (9 characters), 31 + 3 tokens
    for language, text in PROMPTS.items():
        for _ in range(2 if language == "en" else 1):
            r = await gateway.http.post(
                "/v1/chat/completions", json=chat_body(text), headers=auth(tenant.api_key)
            )
            assert r.status_code == 200
            ev = await gateway.wait_event(r.headers["x-request-id"])
            assert ev.event.language == language
    period = str(Period.of(utcnow()))
    r = await gateway.http.get(f"/v1/usage/languages?period={period}", headers=auth(tenant.api_key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "language_report" and body["tenant_id"] == tenant.tenant.id
    rows = {row["language"]: row for row in body["data"]}
    assert set(rows) == set(PROMPTS)
    per_1k = {lang: Decimal(34_000) / Decimal(len(text) + 9) for lang, text in PROMPTS.items()}
    assert rows["en"]["requests"] == 2 and rows["en"]["total_tokens"] == 68
    assert rows["en"]["characters"] == 2 * (len(PROMPTS["en"]) + 9)
    for lang, row in rows.items():
        assert row["model"] == MODEL and row["measured_requests"] == (2 if lang == "en" else 1)
        assert abs(Decimal(str(row["tokens_per_1k_chars"])) - per_1k[lang]) < Decimal("0.01")
        assert abs(Decimal(str(row["premium_vs_en"])) - per_1k[lang] / per_1k["en"]) < Decimal("0.001")
    # the admin report: every tenant (other tests' traffic too), the same schema
    admin = await gateway.http.get(
        f"/admin/v1/reports/languages?period={period}&model={MODEL}", headers=ADMIN
    )
    assert admin.status_code == 200 and admin.json()["object"] == "language_report"
    assert {row["language"] for row in admin.json()["data"]} >= set(PROMPTS)
    html = await gateway.http.get(f"/admin/v1/reports/languages?period={period}&format=html", headers=ADMIN)
    assert html.headers["content-type"].startswith("text/html") and "<td>kk</td>" in html.text
    assert (
        await gateway.http.get(f"/admin/v1/reports/languages?period={period}", headers=auth(tenant.api_key))
    ).status_code == 401
    assert (
        await gateway.http.get("/v1/usage/languages?period=2026-13", headers=auth(tenant.api_key))
    ).status_code == 400
    text = await gateway.metrics()
    assert metric(text, "tokenport_characters_total", model=MODEL, language="kk", part="prompt") >= len(
        PROMPTS["kk"]
    )
    assert metric(text, "tokenport_characters_total", model=MODEL, language="kk", part="completion") >= 9
