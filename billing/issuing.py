"""The write steps of the month close, each one unit of work composed from the persistence modules.

Each step opens ``store.unit()``, reads and locks the rows it changes, asks billing/lifecycle.py
whether the operation is allowed from their status, takes a number when it issues one
(billing/numbering.py), builds the stored JSON, writes, and returns the stored rows; the unit of
work commits when the step returns and rolls everything back when it raises (a number is then never
used). The persistence modules never call back into billing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from billing import credits, document_store, document_writes, engine, lifecycle, numbering
from billing.document_store import Draft, NotFound, StaleDraft, StoredDocument
from billing.documents import CreditNote, DocumentStatus, Invoice, Withholding, document_from_json
from billing.errors import DocumentStateError
from billing.ledger_read import SeqRange
from billing.lifecycle import PENDING, Kind, Op, Status
from billing.partial_credit import check_headroom
from billing.parties import NumberSeries
from billing.render.jsondoc import to_json
from billing.store import BillingStore


def save_pending(
    store: BillingStore, t: str, p: str, content: Draft | str, billed: Iterable[SeqRange], now: datetime
) -> StoredDocument:
    """Create or refresh the tenant's pending invoice for the period: a draft, or the error (a message)."""
    op = Op.RECORD_ERROR if isinstance(content, str) else Op.SAVE_DRAFT
    try:
        with store.unit() as tx:
            current = document_store.live_invoice(tx, t, p)
            if current is not None and current.status is Status.FINALIZED:
                raise DocumentStateError(f"{t} {p} is already invoiced ({current.number})")
            lifecycle.transition(
                Kind.INVOICE, None if current is None else current.status, op, what=f"{t} {p}"
            )
            values = (
                document_writes.error_values(content, now)
                if isinstance(content, str)
                else document_writes.draft_values(content, now)
            )
            doc_id = document_writes.write_pending(tx, current, t, p, values, list(billed), now)
            return document_store.by_id(tx, doc_id)
    except IntegrityError as exc:  # a concurrent run created the same draft first
        raise DocumentStateError(
            f"{t} {p}: another run saved this draft at the same time; run again"
        ) from exc


def discard_pending(store: BillingStore, t: str, p: str) -> None:
    """Drop the tenant's draft or error row for the period: it has nothing left to bill."""
    with store.unit() as tx:
        current = document_store.live_invoice(tx, t, p)
        if current is None or current.status not in PENDING:
            return
        lifecycle.transition(current.kind, current.status, Op.DISCARD, what=f"{t} {p}")
        document_writes.delete_pending(tx, [current.id])


def finalize_draft(
    store: BillingStore, document_id: int, series: NumberSeries, *, now: datetime
) -> StoredDocument:
    """Number one draft and store its finalized JSON: one unit of work (the number is never lost or
    reused)."""
    with store.unit() as tx:
        row = lock_document(tx, document_id)
        what = f"{row.tenant_id} {row.period}" + (f" ({row.number})" if row.number else "")
        try:
            lifecycle.transition(row.kind, row.status, Op.FINALIZE, what=what)
        except DocumentStateError as exc:
            raise DocumentStateError(
                f"{exc}: {row.error}" if row.status is Status.ERROR else str(exc)
            ) from None
        for stale, w in document_store.stale_ranges(tx, row.id, row.tenant_id):
            raise StaleDraft(
                f"{row.tenant_id}: the draft bills usage of {stale.period} after ledger seq {stale.lo},"
                f" but issued invoices now cover it up to seq {w}: run `tokenport invoices run` again"
            )
        assert row.issue_date is not None and row.document is not None
        issue_date = row.issue_date
        name = f"{series.invoice_prefix}{issue_date.year}"
        _check_in_order(tx, name, issue_date)
        sequence = numbering.next_number(tx, name)
        number = series.format("invoice", issue_date.year, sequence)
        doc = finalized(row.document, number)
        if isinstance(doc, Invoice) and doc.total > 0:  # the tenant's prepaid credit, under its lock
            applied = credits.apply(
                tx,
                tenant_id=row.tenant_id,
                currency=doc.currency,
                document_id=row.id,
                number=number,
                total=doc.total,
                on=issue_date,
                now=now,
            )
            if applied:
                doc = with_prepaid(doc, applied)
        content = to_json(doc)
        document_writes.write_finalized(
            tx,
            row.id,
            number=number,
            series=name,
            sequence=sequence,
            content=content,
            issue_date=issue_date,
            now=now,
        )
        return document_store.by_id(tx, row.id)


def void_invoice(
    store: BillingStore,
    document_id: int,
    credit: CreditNote,
    *,
    reason: str,
    series: NumberSeries,
    now: datetime,
) -> tuple[StoredDocument, StoredDocument]:
    """Void a finalized invoice and store its numbered credit note: one unit of work."""
    with store.unit() as tx:
        row = lock_document(tx, document_id)
        number = row.ref
        lifecycle.transition(row.kind, row.status, Op.VOID, what=number)
        credited = document_store.credited(tx, row.id)
        if credited:
            raise DocumentStateError(
                f"{number} has partial credit notes ({credited} credited): voiding would credit it twice;"
                " credit the rest with `tokenport invoices credit`"
            )
        lifecycle.transition(Kind.CREDIT_NOTE, None, Op.ISSUE, what=number)
        document_writes.write_void(tx, row.id, reason=reason, now=now)
        credit_id = _insert_credit_note(tx, row, credit, series, reason=reason, now=now)
        note = document_store.by_id(tx, credit_id)
        credits.restore(tx, invoice_id=row.id, reference=f"{note.ref} voids {number}", now=now)
        return document_store.by_id(tx, row.id), document_store.by_id(tx, credit_id)


def credit_invoice(
    store: BillingStore,
    document_id: int,
    build: Callable[[list[CreditNote]], CreditNote],
    *,
    series: NumberSeries,
    now: datetime,
) -> StoredDocument:
    """Number and store a partial credit note of a finalized invoice, built by ``build`` from the credit
    notes already issued against it, all under the invoice's lock: together they never exceed the
    invoice (billing/partial_credit.py)."""
    with store.unit() as tx:
        row = lock_document(tx, document_id)
        lifecycle.transition(row.kind, row.status, Op.CREDIT, what=row.ref)
        assert row.total is not None
        prior = [
            CreditNote.from_json_dict(d.document)
            for d in document_store.credit_notes(tx, row.id)
            if d.document is not None
        ]
        credit = build(prior)
        check_headroom(row.total, document_store.credited(tx, row.id), credit.total, row.ref)
        credit_id = _insert_credit_note(
            tx,
            row,
            credit,
            series,
            reason=credit.reason,
            now=now,
            amounts=(credit.subtotal, credit.tax_total, credit.total),
        )
        return document_store.by_id(tx, credit_id)


def lock_document(tx: Connection, document_id: int) -> StoredDocument:
    """The document, locked with its tenant's numbering (the order every writer takes the locks in)."""
    tenant = document_store.tenant_of(tx, document_id=document_id)
    if tenant is None:
        raise NotFound(f"no document with id {document_id}")
    numbering.lock_tenant(tx, tenant)
    return document_store.lock(tx, document_id)


def _insert_credit_note(
    tx: Connection,
    row: StoredDocument,
    credit: CreditNote,
    series: NumberSeries,
    *,
    reason: str,
    now: datetime,
    amounts: tuple[Decimal, Decimal, Decimal] | None = None,
) -> int:
    """Number `credit` in its series (dated in order) and store it against `row`."""
    issue = credit.issue_date
    name = f"{series.credit_note_prefix}{issue.year}"
    _check_in_order(tx, name, issue)
    sequence = numbering.next_number(tx, name)
    credit_number = series.format("credit_note", issue.year, sequence)
    return document_writes.insert_credit_note(
        tx,
        row,
        number=credit_number,
        series=name,
        sequence=sequence,
        content=finalized_json(credit.to_json_dict(), credit_number),
        issue_date=issue,
        reason=reason,
        now=now,
        amounts=amounts,
    )


def _check_in_order(tx: Connection, series: str, issue_date: date) -> None:
    """Numbers grow with issue dates within a series: refuse a document dated before the last one numbered."""
    last = document_store.last_issue_date(tx, series)
    if last is not None and issue_date < last:
        raise DocumentStateError(
            f"{series}: a document dated {issue_date} cannot be numbered after one dated {last}"
            " (numbers follow issue dates)"
        )


def with_prepaid(invoice: Invoice, applied: Mapping[str, Decimal]) -> Invoice:
    """The invoice with the prepaid credit applied; a withholding statement follows the amount due."""
    paid = replace(invoice, prepaid=tuple(applied.items()))
    w = invoice.withholding
    if w is None or paid.amount_due <= 0:  # nothing left to pay: nothing to withhold from
        return replace(paid, withholding=None)
    return replace(
        paid, withholding=Withholding.of(w.country, w.rate, w.source, paid.amount_due, paid.currency)
    )


def finalized(draft: dict[str, Any], number: str) -> Invoice | CreditNote:
    """A draft document once it carries its number."""
    doc = document_from_json(draft)
    if doc.status is not DocumentStatus.DRAFT:
        raise DocumentStateError(f"{number}: the stored draft is {doc.status.value}")
    if isinstance(doc, Invoice):
        return engine.finalize(doc, number)
    return engine.finalize(doc, number)


def finalized_json(draft: dict[str, Any], number: str) -> bytes:
    """The stored JSON of a draft document once it carries its number."""
    return to_json(finalized(draft, number))
