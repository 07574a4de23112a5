"""The tenant's own invoices and credit notes (tenant API key), never another tenant's.

    GET /v1/invoices             issued invoices and credit notes of the calling tenant (?period=YYYY-MM)
    GET /v1/invoices/{number}    one of them (?format=json|csv|html|pdf|ubl); 404 for any other number

Drafts are not shown: they are not tax documents and may still change.
"""

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from billing.service import document_summary
from billing.store import ISSUED, StoredDocument
from serving.admin.invoices import (
    PERIOD,
    Format,
    Number,
    billing_service,
    call,
    document_response,
    json_response,
)
from serving.auth import Principal

if TYPE_CHECKING:
    from serving.app import Platform

TENANT_FIELDS = ("number", "kind", "status", "period", "currency", "subtotal", "tax_total", "total",
                 "issue_date", "original_number", "credit_note_number", "usage_digest")


def tenant_view(row: StoredDocument) -> dict[str, Any]:
    summary = document_summary(row)
    return {"object": row.kind, **{k: summary[k] for k in TENANT_FIELDS}}


def build(platform: "Platform") -> APIRouter:
    r = APIRouter(prefix="/v1/invoices", tags=["billing"])
    svc = billing_service(platform)

    async def principal(request: Request) -> Principal:
        return await platform.keyring.authenticate(request.headers.get("authorization"))

    PrincipalDep = Annotated[Principal, Depends(principal)]

    @r.get("")
    async def list_invoices(who: PrincipalDep, period: str | None = Query(default=None, pattern=PERIOD)) -> Response:
        rows = await call(lambda: svc.store.find(tenant_id=who.tenant.id, period=period, statuses=ISSUED))
        return json_response({"object": "list", "data": [tenant_view(x) for x in rows]})

    @r.get("/{number}")
    async def show(number: Number, who: PrincipalDep, format: Format = "json") -> Response:
        data = await call(lambda: svc.render(number, format, tenant_id=who.tenant.id))
        return document_response(data, number, format)

    return r
