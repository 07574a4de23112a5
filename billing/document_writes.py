"""Writing billing documents and their coverage: rows in, nothing decided.

Every function takes the connection of the caller's unit of work (billing/store.py); the service
has asked billing/lifecycle.py first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Connection, CursorResult

from billing.document_store import Draft, StoredDocument
from billing.ledger_read import SeqRange
from billing.lifecycle import Kind, Status
from billing.tables import coverage, documents
from metering.clock import to_naive


def draft_values(draft: Draft, now: datetime) -> dict[str, Any]:
    return {
        "status": Status.DRAFT.value,
        "document": draft.document.decode("utf-8"),
        "document_sha256": None,
        "error": None,
        "currency": draft.currency,
        "subtotal": str(draft.subtotal),
        "tax_total": str(draft.tax_total),
        "total": str(draft.total),
        "issue_date": draft.issue_date,
        "usage_rows": json.dumps(draft.usage_rows),
        "adjustment_rows": json.dumps(draft.adjustment_rows),
        "usage_digest": draft.usage_digest,
        "event_count": draft.event_count,
        "updated_at": to_naive(now),
    }


def error_values(message: str, now: datetime) -> dict[str, Any]:
    return {
        "status": Status.ERROR.value,
        "document": None,
        "document_sha256": None,
        "error": message,
        "currency": None,
        "subtotal": None,
        "tax_total": None,
        "total": None,
        "issue_date": None,
        "usage_rows": None,
        "adjustment_rows": None,
        "usage_digest": None,
        "event_count": 0,
        "updated_at": to_naive(now),
    }


def write_pending(
    conn: Connection,
    current: StoredDocument | None,
    tenant_id: str,
    period: str,
    values: dict[str, Any],
    billed: Sequence[SeqRange],
    now: datetime,
) -> int:
    """Insert or overwrite the pending invoice row and replace its coverage; returns its id."""
    if current is None:
        doc_id = _new_id(
            conn.execute(
                insert(documents).values(
                    kind=Kind.INVOICE.value,
                    tenant_id=tenant_id,
                    period=period,
                    created_at=to_naive(now),
                    **values,
                )
            )
        )
    else:
        doc_id = current.id
        conn.execute(update(documents).where(documents.c.id == doc_id).values(**values))
        conn.execute(delete(coverage).where(coverage.c.document_id == doc_id))
    if billed:
        conn.execute(
            insert(coverage),
            [
                {
                    "document_id": doc_id,
                    "tenant_id": tenant_id,
                    "period": r.period,
                    "seq_from": r.lo,
                    "seq_to": r.hi,
                }
                for r in billed
            ],
        )
    return doc_id


def delete_pending(conn: Connection, document_ids: Sequence[int]) -> None:
    conn.execute(delete(coverage).where(coverage.c.document_id.in_(list(document_ids))))
    conn.execute(delete(documents).where(documents.c.id.in_(list(document_ids))))


def write_finalized(
    conn: Connection,
    document_id: int,
    *,
    number: str,
    series: str,
    sequence: int,
    content: bytes,
    issue_date: date,
    now: datetime,
) -> None:
    conn.execute(
        update(documents)
        .where(documents.c.id == document_id, documents.c.status == Status.DRAFT.value)
        .values(
            status=Status.FINALIZED.value,
            number=number,
            series=series,
            sequence=sequence,
            document=content.decode("utf-8"),
            document_sha256=_sha256(content),
            issue_date=issue_date,
            finalized_at=to_naive(now),
            updated_at=to_naive(now),
        )
    )


def write_void(conn: Connection, document_id: int, *, reason: str, now: datetime) -> None:
    conn.execute(
        update(documents)
        .where(documents.c.id == document_id, documents.c.status == Status.FINALIZED.value)
        .values(
            status=Status.VOID.value, void_reason=reason, voided_at=to_naive(now), updated_at=to_naive(now)
        )
    )


def insert_credit_note(
    conn: Connection,
    original: StoredDocument,
    *,
    number: str,
    series: str,
    sequence: int,
    content: bytes,
    issue_date: date,
    reason: str,
    now: datetime,
    amounts: tuple[Decimal, Decimal, Decimal] | None = None,
) -> int:
    """The numbered credit note of `original` (its amounts, or `amounts` = subtotal, tax, total of a
    partial one; its usage rows and digest), born finalized."""
    subtotal, tax_total, total = amounts or (original.subtotal, original.tax_total, original.total)

    def dec(value: Decimal | None) -> str | None:
        return None if value is None else str(value)

    return _new_id(
        conn.execute(
            insert(documents).values(
                kind=Kind.CREDIT_NOTE.value,
                tenant_id=original.tenant_id,
                period=original.period,
                status=Status.FINALIZED.value,
                number=number,
                series=series,
                sequence=sequence,
                document=content.decode("utf-8"),
                document_sha256=_sha256(content),
                currency=original.currency,
                subtotal=dec(subtotal),
                tax_total=dec(tax_total),
                total=dec(total),
                issue_date=issue_date,
                usage_rows=json.dumps(original.usage_rows),
                adjustment_rows=json.dumps(original.adjustment_rows),
                usage_digest=original.usage_digest,
                event_count=original.event_count,
                original_id=original.id,
                void_reason=reason,
                created_at=to_naive(now),
                updated_at=to_naive(now),
                finalized_at=to_naive(now),
            )
        )
    )


def _new_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
