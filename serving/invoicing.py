"""The month close as the admin API and the CLI both present it: one builder of the billing service
and one JSON shape per result (an invoice run, a finalization, a void, a verification)."""

from __future__ import annotations

from typing import Any

from billing.service import (
    BillingService,
    FinalizeReport,
    RunReport,
    Verification,
    document_summary,
    documents_summary,
)
from billing.store import StoredDocument

__all__ = [
    "BillingService",
    "document_summary",
    "documents_summary",
    "finalize_json",
    "reissue_json",
    "run_json",
    "tenant_document",
    "verify_json",
    "void_json",
]

# What a tenant sees of its own documents (GET /v1/invoices): no drafts, no internal fields.
TENANT_FIELDS = (
    "number",
    "kind",
    "status",
    "period",
    "currency",
    "subtotal",
    "tax_total",
    "total",
    "issue_date",
    "original_number",
    "credit_note_number",
    "usage_digest",
)


def run_json(report: RunReport) -> dict[str, Any]:
    return {
        "object": "invoice_run",
        "period": report.period,
        "issue_date": report.issue_date.isoformat(),
        "drafts": documents_summary(report.drafts),
        "errors": [{"tenant": t, "error": e} for t, e in report.errors],
        "skipped": [{"tenant": t, "reason": why} for t, why in report.skipped],
    }


def finalize_json(report: FinalizeReport) -> dict[str, Any]:
    return {
        "object": "invoice_finalization",
        "period": report.period,
        "closed": report.closed,
        "finalized": documents_summary(report.finalized),
        "refused": [{"tenant": t, "error": e} for t, e in report.refused],
        "forced": report.forced,
    }


def void_json(invoice: StoredDocument, credit: StoredDocument) -> dict[str, Any]:
    return {"invoice": document_summary(invoice), "credit_note": document_summary(credit)}


def credit_json(invoice: str, credit: StoredDocument) -> dict[str, Any]:
    return {"object": "partial_credit_note", "invoice": invoice, "credit_note": document_summary(credit)}


def reissue_json(voided: str, invoice: StoredDocument) -> dict[str, Any]:
    return {"object": "invoice_reissue", "voided": voided, "invoice": document_summary(invoice)}


def verify_json(result: Verification) -> dict[str, Any]:
    return {
        "number": result.number,
        "ok": result.ok,
        "events": result.events,
        "problems": list(result.problems),
    }


def tenant_document(row: StoredDocument) -> dict[str, Any]:
    summary = document_summary(row)
    return {"object": row.kind, **{k: summary[k] for k in TENANT_FIELDS}}
