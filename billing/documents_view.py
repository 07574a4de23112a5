"""Reading issued billing documents: the document as stored, its rendering, its verification against the
ledger, the export report, and the list view shared by the CLI and the APIs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from billing import engine
from billing.document_store import NotFound, StoredDocument
from billing.documents import CreditNote, Document, Invoice, document_from_json
from billing.errors import DocumentStateError
from billing.ledger_read import Slice, event_digest, events_in_ranges, rows_from, rows_of
from billing.lifecycle import ISSUED, PENDING
from billing.render import render
from billing.reports import ExportReport, GroupBy, RatedRow, aggregate_exports, credit_rows, rated_rows
from billing.store import BillingStore
from metering.chain import chain_hash
from metering.clock import Period, utcnow
from metering.store_sql import UsageStore


@dataclass(frozen=True, slots=True)
class Verification:
    number: str
    ok: bool
    problems: tuple[str, ...]
    events: int


def document(row: StoredDocument) -> Document:
    """The stored document; a voided one marked void."""
    if row.document is None:
        raise DocumentStateError(f"{row.ref}: no document: {row.error}")
    doc = document_from_json(row.document)
    if row.status != "void":
        return doc
    if isinstance(doc, Invoice):
        return engine.void(doc)
    return engine.void(doc)


ARCHIVED = ("pdf", "ubl")  # issued documents' renderings kept byte for byte (billing_document_files)


def render_document(store: BillingStore, ref: str, fmt: str, *, tenant_id: str | None = None) -> bytes:
    """The document in json | csv | html | pdf | ubl. A finalized document's JSON is the stored bytes;
    an issued document's PDF and UBL are the archived ones (rendered once, at finalization or void, and
    kept: a later change of templates, fonts or wording never changes what was issued)."""
    row = store.get(ref)
    if tenant_id is not None and (row.tenant_id != tenant_id or row.status in PENDING):
        raise NotFound(f"no invoice or credit note {ref!r}")
    return _served(store, row, fmt, utcnow())


def _served(store: BillingStore, row: StoredDocument, fmt: str, now: datetime) -> bytes:
    if fmt == "json" and row.status == "finalized" and row.document_bytes is not None:
        return row.document_bytes
    if fmt == "ubl" and row.status == "void":  # the UBL as issued (the credit note cancels it)
        issued = store.archived(row.id, "ubl", "finalized")
        if issued is not None:
            return issued
    if fmt in archived_formats(row.status):
        kept = store.archived(row.id, fmt, row.status)
        if kept is not None:
            return kept
        return store.archive(row.id, fmt, row.status, render(document(row), fmt), now)
    return render(document(row), fmt)


def archived_formats(status: str) -> tuple[str, ...]:
    """What is kept of a document in this status: PDF and UBL once issued; a voided invoice's UBL is
    the one issued (UBL has no void state: the credit note cancels it), its PDF gets the VOID mark."""
    if status == "void":
        return ("pdf",)
    return ARCHIVED if status in ISSUED else ()


def archive_issued(store: BillingStore, ref: str, now: datetime) -> None:
    """Render and keep an issued document's PDF and UBL (called right after finalization and void)."""
    row = store.get(ref)
    for fmt in archived_formats(row.status):
        _served(store, row, fmt, now)


def verify(store: BillingStore, usage: UsageStore, number: str) -> Verification:
    """Recompute an invoice's usage digest and quantities from the ledger events it recorded."""
    row = store.get(number)
    problems: list[str] = []
    content = row.document_bytes
    if content is not None and hashlib.sha256(content).hexdigest() != row.document_sha256:
        problems.append("stored document does not match its sha256")
    target = row
    if row.kind == "credit_note" and row.original_number:
        target = store.get(row.original_number)
    own, late = Slice(), Slice()
    for stored in events_in_ranges(usage, target.tenant_id, store.ranges(target.id)):
        recomputed = chain_hash(stored.prev_hash, stored.event)  # from the row's content, not its stored hash
        if recomputed != stored.hash:
            problems.append(
                f"event seq {stored.seq} ({stored.event.request_id}) was changed after it was "
                f"recorded: its content hashes to {recomputed[:16]}…, not {stored.hash[:16]}…"
            )
        stored = replace(stored, hash=recomputed)
        (own if stored.event.started_at.strftime("%Y-%m") == target.period else late).add(stored, "", 0)
    digest = event_digest(own.hashes + late.hashes)
    if digest != target.usage_digest:
        problems.append(f"usage digest {digest} != recorded {target.usage_digest}")
    if rows_of(own.rows()) != target.usage_rows or rows_of(late.rows()) != target.adjustment_rows:
        problems.append("usage quantities recomputed from the ledger differ from the recorded ones")
    return Verification(row.ref, not problems, tuple(problems), own.events + late.events)


def exports(store: BillingStore, period: Period, *, by: GroupBy | str = GroupBy.COUNTRY) -> ExportReport:
    """Token export volume and revenue (CNY at the recorded rates) of the period's issued documents."""
    p = str(period)
    rows: list[RatedRow] = []
    by_invoice: dict[str, list[RatedRow]] = {}
    docs = store.find(period=p, statuses=ISSUED)
    for row in docs:
        if row.kind == "invoice" and row.document is not None:
            invoice = Invoice.from_json_dict(row.document)
            rated = rated_rows(invoice, rows_from(row.usage_rows), rows_from(row.adjustment_rows))
            by_invoice[row.ref] = rated
            rows += rated
    for row in docs:
        if row.kind == "credit_note" and row.document is not None:
            note = CreditNote.from_json_dict(row.document)
            rows += credit_rows(note, by_invoice.get(note.original_number, []))
    return aggregate_exports(rows, period=p, by=by)


def document_summary(row: StoredDocument) -> dict[str, Any]:
    """The list view of a document (CLI ``--json``, admin and tenant APIs)."""
    return {
        "number": row.number,
        "ref": row.ref,
        "kind": row.kind,
        "status": row.status,
        "tenant": row.tenant_id,
        "period": row.period,
        "currency": row.currency,
        "subtotal": None if row.subtotal is None else format(row.subtotal, "f"),
        "tax_total": None if row.tax_total is None else format(row.tax_total, "f"),
        "total": None if row.total is None else format(row.total, "f"),
        "issue_date": row.issue_date.isoformat() if row.issue_date else None,
        "original_number": row.original_number,
        "credit_note_number": row.credit_note_number,
        "events": row.event_count,
        "usage_digest": row.usage_digest,
        "error": row.error,
    }


def documents_summary(rows: Iterable[StoredDocument]) -> list[dict[str, Any]]:
    return [document_summary(r) for r in rows]
