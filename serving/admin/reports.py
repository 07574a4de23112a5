"""Admin API for billing reports (/admin/v1/reports), behind the admin credential.

    GET /admin/v1/reports/exports?period=YYYY-MM&by=country|tenant|model|language&format=json|csv|html

Token export volume and revenue by destination (the usage's origin country), tenant, model or
language, from the period's issued invoices and credit notes; revenue net of tax, converted to CNY
with the FX rate each invoice recorded.
"""

from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from billing.ledger_read import Period
from billing.render.report import render_report
from serving.admin.auth import Admin
from serving.admin.invoices import PERIOD, billing_service, call

if TYPE_CHECKING:
    from serving.app import Platform

MEDIA = {"json": "application/json", "csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8"}


def build(platform: "Platform") -> APIRouter:
    r = APIRouter(prefix="/admin/v1/reports", tags=["admin", "billing"])
    AdminDep = Annotated[Admin, Depends(platform.admin)]
    svc = billing_service(platform)

    @r.get("/exports")
    async def exports(
        _admin: AdminDep,
        period: str = Query(pattern=PERIOD),
        by: Literal["country", "tenant", "model", "language"] = "country",
        format: Literal["json", "csv", "html"] = "json",
    ) -> Response:
        text = await call(lambda: render_report(svc.exports(Period.parse(period), by=by), format))
        return Response(text.encode("utf-8"), media_type=MEDIA[format])

    return r
