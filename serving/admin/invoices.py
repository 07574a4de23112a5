"""Admin API for invoices and credit notes (/admin/v1/invoices), behind the admin credential.

    GET  /admin/v1/invoices                     list (?period=YYYY-MM&tenant=ID&status=...)
    POST /admin/v1/invoices/run                 {"period", "tenant"?, "issue_date"?}: create or refresh drafts
    POST /admin/v1/invoices/finalize            {"period", "tenant"?}: number drafts (gapless), close the period
    GET  /admin/v1/invoices/{number}            the document (?format=json|csv|html|pdf|ubl, default json)
    POST /admin/v1/invoices/{number}/void       {"reason", "issue_date"?}: void it with a credit note
    GET  /admin/v1/invoices/{number}/verify     recompute its usage digest from the ledger

Run and finalize answer 200 with per-tenant ``errors`` / ``refused`` lists (the others are done);
run, finalize and void are written to the audit log. Billing errors map to 4xx: unknown document
404, forbidden state change 409, invalid input 400.
"""

import asyncio
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from billing.errors import BillingError, ConfigError, DocumentStateError, FxImportError, InvalidUsage
from billing.ledger_read import Period
from billing.service import BillingService, document_summary, documents_summary
from billing.store import BillingStore
from billing.store import NotFound as DocumentNotFound
from serving.admin.audit import Who
from serving.admin.auth import Admin
from serving.errors import Conflict, InvalidRequest, NotFound, TokenportError

if TYPE_CHECKING:
    from serving.app import Platform

T = TypeVar("T")
PERIOD = r"^\d{4}-\d{2}$"
Number = Annotated[str, Path(min_length=1, max_length=96)]
Format = Literal["json", "csv", "html", "pdf", "ubl"]
MEDIA = {"json": "application/json", "csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8",
         "pdf": "application/pdf", "ubl": "application/xml"}
EXTENSION = {"json": "json", "csv": "csv", "html": "html", "pdf": "pdf", "ubl": "xml"}


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunIn(_In):
    period: str = Field(pattern=PERIOD)
    tenant: str | None = Field(default=None, min_length=1, max_length=64)
    issue_date: date | None = None


class FinalizeIn(_In):
    period: str = Field(pattern=PERIOD)
    tenant: str | None = Field(default=None, min_length=1, max_length=64)


class VoidIn(_In):
    reason: str = Field(min_length=1, max_length=500)
    issue_date: date | None = None


def billing_service(platform: "Platform") -> BillingService:
    """The billing service over the platform's database and configs (one per router)."""
    return BillingService(store=BillingStore(platform.engine), usage=platform.usage, tenants=platform.tenants,
                          config_dir=platform.settings.config_dir / "billing")


def billing_error(exc: BillingError) -> TokenportError:
    message = str(exc)
    if isinstance(exc, DocumentNotFound):
        return NotFound(message, code="invoice_not_found")
    if isinstance(exc, DocumentStateError):
        return Conflict(message, code="invoice_state")
    if isinstance(exc, (InvalidUsage, FxImportError)):
        return InvalidRequest(message, code="invalid_billing_request")
    if isinstance(exc, ConfigError):
        return Conflict(message, code="billing_config")
    return Conflict(message, code="billing_error")


async def call(fn: Callable[[], T]) -> T:
    """Run blocking billing work off the event loop; billing errors become API errors."""
    try:
        return await asyncio.to_thread(fn)
    except BillingError as exc:
        raise billing_error(exc) from exc


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status, media_type="application/json")


def document_response(data: bytes, ref: str, fmt: str) -> Response:
    disposition = f'inline; filename="{ref}.{EXTENSION[fmt]}"'
    return Response(data, media_type=MEDIA[fmt], headers={"Content-Disposition": disposition})


def build(platform: "Platform") -> APIRouter:
    r = APIRouter(prefix="/admin/v1/invoices", tags=["admin", "billing"])
    AdminDep = Annotated[Admin, Depends(platform.admin)]
    svc = billing_service(platform)
    audit = platform.guardrails.audit

    @r.get("")
    async def list_invoices(
        _admin: AdminDep,
        period: str | None = Query(default=None, pattern=PERIOD),
        tenant: str | None = Query(default=None, max_length=64),
        status: Literal["draft", "error", "finalized", "void"] | None = None,
    ) -> Response:
        rows = await call(lambda: svc.store.find(period=period, tenant_id=tenant,
                                                 statuses=[status] if status else None))
        return json_response({"object": "list", "data": documents_summary(rows)})

    @r.post("/run")
    async def run(body: RunIn, admin: AdminDep) -> Response:
        def work() -> dict[str, Any]:
            report = svc.run(Period.parse(body.period), tenant_id=body.tenant, issue_date=body.issue_date)
            return {"object": "invoice_run", "period": report.period, "issue_date": report.issue_date.isoformat(),
                    "drafts": documents_summary(report.drafts),
                    "errors": [{"tenant": t, "error": e} for t, e in report.errors],
                    "skipped": [{"tenant": t, "reason": why} for t, why in report.skipped]}

        out = await call(lambda: audit.run(Who.api(admin), "invoices.run", work, target=body.period,
                                           tenant_id=body.tenant, detail=body.model_dump(mode="json"),
                                           describe=lambda o: {"drafts": len(o["drafts"]), "errors": o["errors"]}))
        return json_response(out)

    @r.post("/finalize")
    async def finalize(body: FinalizeIn, admin: AdminDep) -> Response:
        def work() -> dict[str, Any]:
            report = svc.finalize(Period.parse(body.period), tenant_id=body.tenant)
            return {"object": "invoice_finalization", "period": report.period, "closed": report.closed,
                    "finalized": documents_summary(report.finalized),
                    "refused": [{"tenant": t, "error": e} for t, e in report.refused]}

        out = await call(lambda: audit.run(
            Who.api(admin), "invoices.finalize", work, target=body.period, tenant_id=body.tenant,
            detail=body.model_dump(mode="json"),
            describe=lambda o: {"numbers": [d["number"] for d in o["finalized"]], "refused": o["refused"]}))
        return json_response(out)

    @r.get("/{number}")
    async def show(number: Number, _admin: AdminDep, format: Format = "json") -> Response:
        data = await call(lambda: svc.render(number, format))
        return document_response(data, number, format)

    @r.post("/{number}/void")
    async def void(number: Number, body: VoidIn, admin: AdminDep) -> Response:
        invoice, credit = await call(lambda: audit.run(
            Who.api(admin), "invoices.void", lambda: svc.void(number, reason=body.reason, issue_date=body.issue_date),
            target=number, detail=body.model_dump(mode="json"),
            describe=lambda res: {"tenant": res[0].tenant_id, "credit_note": res[1].number}))
        return json_response({"invoice": document_summary(invoice), "credit_note": document_summary(credit)})

    @r.get("/{number}/verify")
    async def verify(number: Number, _admin: AdminDep) -> Response:
        result = await call(lambda: svc.verify(number))
        return json_response({"number": result.number, "ok": result.ok, "events": result.events,
                              "problems": list(result.problems)})

    return r
