"""The tenant's own invoices and credit notes (tenant API key), never another tenant's.

    GET /v1/invoices             issued invoices and credit notes of the calling tenant (?period=YYYY-MM)
    GET /v1/invoices/{number}    one of them (?format=json|csv|html|pdf|ubl); 404 for any other number

Drafts are not shown: they are not tax documents and may still change.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query
from starlette.responses import Response

from billing.store import ISSUED
from serving.deps import BillingDep, PrincipalDep
from serving.documents_http import PERIOD, Format, Number, document_response, json_response
from serving.invoicing import tenant_document

router = APIRouter(prefix="/v1/invoices", tags=["billing"])


@router.get("")
async def list_invoices(
    who: PrincipalDep, svc: BillingDep, period: str | None = Query(default=None, pattern=PERIOD)
) -> Response:
    rows = await asyncio.to_thread(svc.store.find, tenant_id=who.tenant.id, period=period, statuses=ISSUED)
    return json_response({"object": "list", "data": [tenant_document(x) for x in rows]})


@router.get("/{number}")
async def show(number: Number, who: PrincipalDep, svc: BillingDep, format: Format = "json") -> Response:
    data = await asyncio.to_thread(lambda: svc.render(number, format, tenant_id=who.tenant.id))
    return document_response(data, number, format)
