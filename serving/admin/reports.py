"""Admin API for billing reports (/admin/v1/reports), behind the admin credential.

    GET /admin/v1/reports/exports?period=YYYY-MM&by=country|tenant|model|language&format=json|csv|html
    GET /admin/v1/reports/languages?period=YYYY-MM[&model=M]&format=json|csv|html
    (metering/language_report.py)

Token export volume and revenue by destination (the usage's origin country), tenant, model or
language, from the period's issued invoices and credit notes; revenue net of tax, converted to CNY
with the FX rate each invoice recorded.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query
from starlette.responses import Response

from billing.render.report import render_report
from metering.clock import Period
from metering.language_report import language_report
from metering.language_report import render as render_languages
from serving.deps import AdminDep, BillingDep, UsageDep
from serving.documents_http import PERIOD

router = APIRouter(prefix="/admin/v1/reports", tags=["admin", "billing"])
MEDIA = {"json": "application/json", "csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8"}


@router.get("/exports")
async def exports(
    _admin: AdminDep,
    svc: BillingDep,
    period: str = Query(pattern=PERIOD),
    by: Literal["country", "buyer_country", "tenant", "model", "language"] = "country",
    format: Literal["json", "csv", "html"] = "json",
) -> Response:
    text = await asyncio.to_thread(lambda: render_report(svc.exports(Period.parse(period), by=by), format))
    return Response(text.encode("utf-8"), media_type=MEDIA[format])


@router.get("/languages")
async def languages(
    _admin: AdminDep,
    usage: UsageDep,
    period: str = Query(pattern=PERIOD),
    model: str | None = Query(default=None, max_length=128),
    format: Literal["json", "csv", "html"] = "json",
) -> Response:
    """The token-tax report from real traffic: per language and model, tokens per 1,000 characters and
    the premium against English on the same model."""
    report = await asyncio.to_thread(language_report, usage, Period.parse(period), model=model)
    return Response(render_languages(report, format).encode("utf-8"), media_type=MEDIA[format])
