"""Admin API for invoices and credit notes (/admin/v1/invoices), behind the admin credential.

    GET  /admin/v1/invoices                     list (?period=YYYY-MM&tenant=ID&status=...)
    POST /admin/v1/invoices/run                 {"period", "tenant"?, "issue_date"?}: create or refresh drafts
    POST /admin/v1/invoices/finalize            {"period", "tenant"?, "force"?}: number drafts (gapless),
    close the period
    GET  /admin/v1/invoices/{number}            the document (?format=json|csv|html|pdf|ubl, default json)
    POST /admin/v1/invoices/{number}/void       {"reason", "issue_date"?}: void it with a credit note
    POST /admin/v1/invoices/{number}/credit-notes {"reason", "lines"? | "amount"?, "issue_date"?}: a partial
    credit note (some lines as printed, or a net amount spread over the lines)
    POST /admin/v1/invoices/{number}/payments   {"amount", "date", "reference", "wht_amount"?,
    "wht_certificate"?}
    GET  /admin/v1/invoices/{number}/status     payment status (due, received, withheld, outstanding)
    GET  /admin/v1/invoices/aging?as_of=        outstanding per tenant and currency by days past due
    POST /admin/v1/invoices/{number}/reissue    bill a voided invoice's usage again (new number, today)
    GET  /admin/v1/invoices/{number}/verify     recompute its usage digest from the ledger

Run and finalize answer 200 with per-tenant ``errors`` / ``refused`` lists (the others are done);
run, finalize and void are written to the audit log. Billing errors map to 4xx by type
(serving/api_errors.py): unknown document 404, forbidden state change 409, invalid input 400.
"""

from __future__ import annotations

import asyncio
from datetime import date
from decimal import Decimal
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from metering.clock import Period
from serving.deps import AdminDep, AuditDep, BillingDep
from serving.documents_http import PERIOD, Format, Number, document_response, json_response
from serving.invoicing import (
    credit_json,
    documents_summary,
    finalize_json,
    reissue_json,
    run_json,
    verify_json,
    void_json,
)

router = APIRouter(prefix="/admin/v1/invoices", tags=["admin", "billing"])


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunIn(_In):
    period: str = Field(pattern=PERIOD)
    tenant: str | None = Field(default=None, min_length=1, max_length=64)
    issue_date: date | None = None


class FinalizeIn(_In):
    period: str = Field(pattern=PERIOD)
    tenant: str | None = Field(default=None, min_length=1, max_length=64)
    force: bool = False  # before the period ended (+ billing.finalize_grace_days); audited


class CreditIn(_In):
    reason: str = Field(min_length=1, max_length=500)
    lines: list[int] | None = Field(default=None, min_length=1, max_length=10_000)
    amount: Decimal | None = Field(default=None, gt=0, max_digits=20, decimal_places=6)
    issue_date: date | None = None


class PaymentIn(_In):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    amount: Decimal = Field(gt=0, max_digits=20, decimal_places=6)
    on: date = Field(alias="date")
    reference: str = Field(min_length=1, max_length=200)
    wht_amount: Decimal = Field(default=Decimal(0), ge=0, max_digits=20, decimal_places=6)
    wht_certificate: str | None = Field(default=None, min_length=1, max_length=200)


class VoidIn(_In):
    reason: str = Field(min_length=1, max_length=500)
    issue_date: date | None = None


@router.get("")
async def list_invoices(
    _admin: AdminDep,
    svc: BillingDep,
    period: str | None = Query(default=None, pattern=PERIOD),
    tenant: str | None = Query(default=None, max_length=64),
    status: Literal["draft", "error", "finalized", "void"] | None = None,
) -> Response:
    rows = await asyncio.to_thread(
        svc.store.find, period=period, tenant_id=tenant, statuses=[status] if status else None
    )
    return json_response({"object": "list", "data": documents_summary(rows)})


@router.post("/run")
async def run(body: RunIn, admin: AdminDep, svc: BillingDep, audit: AuditDep) -> Response:
    def work() -> dict[str, Any]:
        return run_json(svc.run(Period.parse(body.period), tenant_id=body.tenant, issue_date=body.issue_date))

    out = await asyncio.to_thread(
        lambda: audit.run(
            admin.who(),
            "invoices.run",
            work,
            target=body.period,
            tenant_id=body.tenant,
            detail=body.model_dump(mode="json"),
            describe=lambda o: {"drafts": len(o["drafts"]), "errors": o["errors"]},
        )
    )
    return json_response(out)


@router.post("/finalize")
async def finalize(body: FinalizeIn, admin: AdminDep, svc: BillingDep, audit: AuditDep) -> Response:
    def work() -> dict[str, Any]:
        return finalize_json(svc.finalize(Period.parse(body.period), tenant_id=body.tenant, force=body.force))

    out = await asyncio.to_thread(
        lambda: audit.run(
            admin.who(),
            "invoices.finalize",
            work,
            target=body.period,
            tenant_id=body.tenant,
            detail=body.model_dump(mode="json"),
            describe=lambda o: {
                "numbers": [d["number"] for d in o["finalized"]],
                "refused": o["refused"],
                "forced": o["forced"],
            },
        )
    )
    return json_response(out)


@router.get("/aging")
async def aging(_admin: AdminDep, svc: BillingDep, as_of: date | None = None) -> Response:
    rows = await asyncio.to_thread(svc.aging, as_of)
    return json_response({"object": "aging", "as_of": as_of.isoformat() if as_of else None, "data": rows})


@router.get("/{number}/status")
async def payment_status(number: Number, _admin: AdminDep, svc: BillingDep) -> Response:
    r = await asyncio.to_thread(svc.receivable, number)
    return json_response(r.to_json_dict())


@router.post("/{number}/payments", status_code=201)
async def pay(number: Number, body: PaymentIn, admin: AdminDep, svc: BillingDep, audit: AuditDep) -> Response:
    r = await asyncio.to_thread(
        lambda: audit.run(
            admin.who(),
            "invoices.pay",
            lambda: svc.pay(
                number,
                amount=body.amount,
                on=body.on,
                reference=body.reference,
                withheld=body.wht_amount,
                certificate=body.wht_certificate,
            ),
            target=number,
            detail=body.model_dump(mode="json"),
            describe=lambda res: {"status": res.status, "outstanding": str(res.outstanding)},
        )
    )
    return json_response(r.to_json_dict(), 201)


@router.get("/{number}")
async def show(number: Number, _admin: AdminDep, svc: BillingDep, format: Format = "json") -> Response:
    data = await asyncio.to_thread(svc.render, number, format)
    return document_response(data, number, format)


@router.post("/{number}/void")
async def void(number: Number, body: VoidIn, admin: AdminDep, svc: BillingDep, audit: AuditDep) -> Response:
    invoice, credit = await asyncio.to_thread(
        lambda: audit.run(
            admin.who(),
            "invoices.void",
            lambda: svc.void(number, reason=body.reason, issue_date=body.issue_date),
            target=number,
            detail=body.model_dump(mode="json"),
            describe=lambda res: {"tenant": res[0].tenant_id, "credit_note": res[1].number},
        )
    )
    return json_response(void_json(invoice, credit))


@router.post("/{number}/credit-notes", status_code=201)
async def credit(
    number: Number, body: CreditIn, admin: AdminDep, svc: BillingDep, audit: AuditDep
) -> Response:
    note = await asyncio.to_thread(
        lambda: audit.run(
            admin.who(),
            "invoices.credit",
            lambda: svc.credit(
                number, reason=body.reason, lines=body.lines, amount=body.amount, issue_date=body.issue_date
            ),
            target=number,
            detail=body.model_dump(mode="json"),
            describe=lambda res: {
                "tenant": res.tenant_id,
                "credit_note": res.number,
                "total": str(res.total),
            },
        )
    )
    return json_response(credit_json(number, note), 201)


@router.post("/{number}/reissue")
async def reissue(number: Number, admin: AdminDep, svc: BillingDep, audit: AuditDep) -> Response:
    row = await asyncio.to_thread(
        lambda: audit.run(
            admin.who(),
            "invoices.reissue",
            lambda: svc.reissue(number),
            target=number,
            describe=lambda r: {"tenant": r.tenant_id, "invoice": r.number},
        )
    )
    return json_response(reissue_json(number, row))


@router.get("/{number}/verify")
async def verify(number: Number, _admin: AdminDep, svc: BillingDep) -> Response:
    return json_response(verify_json(await asyncio.to_thread(svc.verify, number)))
