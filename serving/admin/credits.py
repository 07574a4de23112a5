"""Admin API for prepaid credit (/admin/v1/tenants/{tenant_id}/credits), behind the admin credential.

    POST   /admin/v1/tenants/{tenant_id}/credits    grant credit (201): paid (a top-up, with a numbered
                                                   receipt) or promotional (optional expiry); audited
    GET    /admin/v1/tenants/{tenant_id}/credits    the balance, paid and promotional apart, and its ledger
    GET    /admin/v1/credits/receipts/{number}?format=json|html|pdf   a paid top-up's receipt

A tenant with a prepaid money budget has the grant added to it in the same transaction
(serving/credits.py); the gateways pick it up at their next policy refresh.
"""

from __future__ import annotations

import asyncio
from datetime import date
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from serving import credits
from serving.admin.tenants import Amount, TenantId
from serving.deps import AdminDep, BillingDep, PoliciesDep, TenantsDep
from serving.documents_http import json_response

router = APIRouter(prefix="/admin/v1", tags=["admin"])


class CreditIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Amount
    kind: Literal["paid", "promotional"] = "paid"
    reference: str = Field(min_length=1, max_length=200)
    expires_on: date | None = None


@router.post("/tenants/{tenant_id}/credits", status_code=201)
async def add_credit(
    tenant_id: TenantId,
    body: CreditIn,
    admin: AdminDep,
    svc: BillingDep,
    accounts: TenantsDep,
    policies: PoliciesDep,
) -> Response:
    got = await asyncio.to_thread(
        lambda: credits.add_credit(
            svc,
            accounts,
            admin.who(),
            tenant_id,
            kind=body.kind,
            amount=Decimal(str(body.amount)),
            reference=body.reference,
            expires_on=body.expires_on,
        )
    )
    if got["prepaid_budget_raised"]:
        await policies.refresh(force=True)
    return json_response(got, 201)


@router.get("/tenants/{tenant_id}/credits")
async def balance(tenant_id: TenantId, _admin: AdminDep, svc: BillingDep, accounts: TenantsDep) -> Response:
    return json_response(await asyncio.to_thread(credits.balance, svc, accounts, tenant_id))


RECEIPT_TYPES = {"json": "application/json", "html": "text/html; charset=utf-8", "pdf": "application/pdf"}


@router.get("/credits/receipts/{number}")
async def receipt(
    number: Annotated[str, PathParam(min_length=1, max_length=64)],
    _admin: AdminDep,
    svc: BillingDep,
    format: Literal["json", "html", "pdf"] = "json",
) -> Response:
    data = await asyncio.to_thread(svc.receipt, number, format)
    return Response(data, media_type=RECEIPT_TYPES[format])
