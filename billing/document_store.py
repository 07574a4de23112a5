"""Reading billing documents and the ledger events they bill (writes: billing/document_writes.py).

Every function takes the connection of the caller's unit of work (billing/store.py); which status
may become which is billing/lifecycle.py's, and the composition of a finalization or a void is the
service's.

Coverage: ``W(tenant, period)`` = the highest ``seq_to`` of the tenant's finalized (not voided)
invoices for that period: every event of (tenant, period) with ``seq <= W`` is billed. A draft
records the ranges it would bill; finalizing refuses a draft whose ranges no longer start at the
current ``W`` (another invoice billed some of those events since: the draft is stale).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Connection, RowMapping

from billing.errors import BillingError, DocumentStateError
from billing.ledger_read import SeqRange
from billing.lifecycle import ISSUED, PENDING, Kind, Status
from billing.tables import coverage, documents
from metering.clock import to_aware

_ISSUED = [s.value for s in ISSUED]
_PENDING = [s.value for s in PENDING]


class StaleDraft(DocumentStateError):
    """The draft bills ledger events that another invoice billed after the draft was built."""


class NotFound(BillingError):
    pass


@dataclass(frozen=True, slots=True)
class StoredDocument:
    id: int
    kind: Kind
    tenant_id: str
    period: str
    status: Status
    number: str | None
    document_bytes: bytes | None  # the stored JSON, exactly
    document_sha256: str | None
    error: str | None
    currency: str | None
    subtotal: Decimal | None
    tax_total: Decimal | None
    total: Decimal | None
    issue_date: date | None
    usage_rows: list[dict[str, Any]]
    adjustment_rows: list[dict[str, Any]]
    usage_digest: str | None
    event_count: int
    original_number: str | None
    credit_note_number: str | None
    void_reason: str | None
    created_at: datetime
    updated_at: datetime
    finalized_at: datetime | None
    voided_at: datetime | None

    @property
    def document(self) -> dict[str, Any] | None:
        return None if self.document_bytes is None else dict(json.loads(self.document_bytes))

    @property
    def ref(self) -> str:
        """The number, or ``DRAFT-<period>-<tenant>`` before finalization."""
        return self.number or f"DRAFT-{self.period}-{self.tenant_id}"


@dataclass(frozen=True, slots=True)
class Draft:
    """A pending invoice's content: the engine's draft JSON and what it bills."""

    tenant_id: str
    period: str
    document: bytes
    currency: str
    subtotal: Decimal
    tax_total: Decimal
    total: Decimal
    issue_date: date
    usage_rows: list[dict[str, Any]]
    adjustment_rows: list[dict[str, Any]]
    usage_digest: str
    event_count: int
    ranges: Sequence[SeqRange]


def parse_ref(ref: str) -> tuple[str, str] | None:
    """(period, tenant) of a ``DRAFT-YYYY-MM-tenant`` reference, else None."""
    if ref.startswith("DRAFT-") and len(ref) > 14 and ref[13] == "-":
        return ref[6:13], ref[14:]
    return None


# --- reading ---------------------------------------------------------------------------------
def _query() -> Any:
    orig = documents.alias("orig")
    credit = documents.alias("credit")
    return select(
        documents, orig.c.number.label("original_number"), credit.c.number.label("credit_note_number")
    ).select_from(
        documents.outerjoin(orig, orig.c.id == documents.c.original_id).outerjoin(
            credit, and_(credit.c.original_id == documents.c.id, credit.c.kind == Kind.CREDIT_NOTE.value)
        )
    )


def load(conn: Connection, *conds: Any) -> list[StoredDocument]:
    rows = conn.execute(_query().where(*conds).order_by(documents.c.id)).mappings().all()
    return [_document(r) for r in rows]


def by_id(conn: Connection, document_id: int) -> StoredDocument:
    found = load(conn, documents.c.id == document_id)
    if not found:
        raise NotFound(f"no document with id {document_id}")
    return found[0]


def get(conn: Connection, ref: str) -> StoredDocument:
    """A document by number or draft reference; raises NotFound."""
    draft = parse_ref(ref)
    if draft is not None:
        found = load(
            conn,
            documents.c.period == draft[0],
            documents.c.tenant_id == draft[1],
            documents.c.kind == Kind.INVOICE.value,
            documents.c.status.in_(_PENDING),
        )
    else:
        found = load(conn, documents.c.number == ref)
    if not found:
        raise NotFound(f"no invoice or credit note {ref!r}")
    return found[0]


def find(
    conn: Connection,
    *,
    tenant_id: str | None = None,
    period: str | None = None,
    statuses: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
) -> list[StoredDocument]:
    conds: list[Any] = []
    if tenant_id is not None:
        conds.append(documents.c.tenant_id == tenant_id)
    if period is not None:
        conds.append(documents.c.period == period)
    if statuses is not None:
        conds.append(documents.c.status.in_([str(s) for s in statuses]))
    if kinds is not None:
        conds.append(documents.c.kind.in_([str(k) for k in kinds]))
    return load(conn, *conds)


def billed_through(conn: Connection, tenant_ids: Iterable[str] | None = None) -> dict[tuple[str, str], int]:
    """W(tenant, period): the highest ledger seq billed by finalized invoices, per tenant and period.

    A voided invoice bills nothing any more: its events are billable again (re-issue).
    """
    q = (
        select(coverage.c.tenant_id, coverage.c.period, func.max(coverage.c.seq_to))
        .select_from(coverage.join(documents, documents.c.id == coverage.c.document_id))
        .where(documents.c.status == Status.FINALIZED.value)
        .group_by(coverage.c.tenant_id, coverage.c.period)
    )
    if tenant_ids is not None:
        q = q.where(coverage.c.tenant_id.in_(list(tenant_ids)))
    return {(t, p): int(w) for t, p, w in conn.execute(q).all()}


def ranges(conn: Connection, document_id: int) -> list[SeqRange]:
    rows = (
        conn.execute(
            select(coverage).where(coverage.c.document_id == document_id).order_by(coverage.c.period)
        )
        .mappings()
        .all()
    )
    return [SeqRange(r["period"], int(r["seq_from"]), int(r["seq_to"])) for r in rows]


def invoice_states(conn: Connection, periods: Iterable[str]) -> dict[tuple[str, str], set[str]]:
    """(tenant, period) -> statuses of its invoices in those periods."""
    wanted = list(periods)
    if not wanted:
        return {}
    rows = conn.execute(
        select(documents.c.tenant_id, documents.c.period, documents.c.status).where(
            documents.c.kind == Kind.INVOICE.value, documents.c.period.in_(wanted)
        )
    ).all()
    out: dict[tuple[str, str], set[str]] = {}
    for t, p, s in rows:
        out.setdefault((t, p), set()).add(s)
    return out


def invoiced_periods(conn: Connection) -> set[str]:
    return set(
        conn.execute(
            select(documents.c.period)
            .where(documents.c.kind == Kind.INVOICE.value, documents.c.status.in_(_ISSUED))
            .distinct()
        ).scalars()
    )


# --- locking reads (inside a write unit of work) ----------------------------------------------
def lock(conn: Connection, document_id: int) -> StoredDocument:
    """The row, locked until the unit of work ends (PostgreSQL; SQLite serializes writers)."""
    conn.execute(select(documents.c.id).where(documents.c.id == document_id).with_for_update())
    return by_id(conn, document_id)


def tenant_of(conn: Connection, *, document_id: int | None = None, number: str | None = None) -> str | None:
    cond = documents.c.id == document_id if number is None else documents.c.number == number
    tenant: str | None = conn.execute(select(documents.c.tenant_id).where(cond)).scalar()
    return tenant


def live_invoice(conn: Connection, tenant_id: str, period: str) -> StoredDocument | None:
    """The tenant's pending or finalized invoice for the period (at most one: a unique index), locked."""
    key = and_(
        documents.c.tenant_id == tenant_id,
        documents.c.period == period,
        documents.c.kind == Kind.INVOICE.value,
        documents.c.status.in_([*_PENDING, Status.FINALIZED.value]),
    )
    doc_id = conn.execute(select(documents.c.id).where(key).with_for_update()).scalar()
    return None if doc_id is None else by_id(conn, int(doc_id))


def stale_ranges(conn: Connection, document_id: int, tenant_id: str) -> list[tuple[SeqRange, int]]:
    """The document's ranges that no longer start at the current W of their period, with that W."""
    mine = ranges(conn, document_id)
    if not mine:
        return []
    current = dict(
        conn.execute(
            select(coverage.c.period, func.max(coverage.c.seq_to))
            .select_from(coverage.join(documents, documents.c.id == coverage.c.document_id))
            .where(
                coverage.c.tenant_id == tenant_id,
                coverage.c.period.in_({r.period for r in mine}),
                documents.c.status == Status.FINALIZED.value,
            )
            .group_by(coverage.c.period)
        ).all()
    )
    return [(r, int(current.get(r.period, 0))) for r in mine if int(current.get(r.period, 0)) != r.lo]


def _document(r: RowMapping) -> StoredDocument:
    raw = r["document"]
    return StoredDocument(
        id=int(r["id"]),
        kind=Kind(r["kind"]),
        tenant_id=r["tenant_id"],
        period=r["period"],
        status=Status(r["status"]),
        number=r["number"],
        document_bytes=raw.encode("utf-8") if raw else None,
        document_sha256=r["document_sha256"],
        error=r["error"],
        currency=r["currency"],
        subtotal=_dec(r["subtotal"]),
        tax_total=_dec(r["tax_total"]),
        total=_dec(r["total"]),
        issue_date=r["issue_date"],
        usage_rows=json.loads(r["usage_rows"]) if r["usage_rows"] else [],
        adjustment_rows=json.loads(r["adjustment_rows"]) if r["adjustment_rows"] else [],
        usage_digest=r["usage_digest"],
        event_count=int(r["event_count"] or 0),
        original_number=r["original_number"],
        credit_note_number=r["credit_note_number"],
        void_reason=r["void_reason"],
        created_at=_aware(r["created_at"]),
        updated_at=_aware(r["updated_at"]),
        finalized_at=to_aware(r["finalized_at"]),
        voided_at=to_aware(r["voided_at"]),
    )


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _aware(value: datetime) -> datetime:
    out = to_aware(value)
    assert out is not None
    return out


def last_issue_date(conn: Connection, series: str) -> date | None:
    """The latest issue date numbered in the series (numbers must not go back in time)."""
    found: date | None = conn.execute(
        select(func.max(documents.c.issue_date)).where(documents.c.series == series)
    ).scalar()
    return found


def credit_notes(conn: Connection, invoice_id: int) -> list[StoredDocument]:
    """The credit notes issued against an invoice (partial ones and a void's), oldest first."""
    return load(conn, documents.c.original_id == invoice_id, documents.c.kind == "credit_note")


def credited(conn: Connection, invoice_id: int) -> Decimal:
    """The total of the credit notes issued against an invoice (partial ones and a void's)."""
    totals = conn.execute(
        select(documents.c.total).where(
            documents.c.original_id == invoice_id, documents.c.kind == "credit_note"
        )
    ).scalars()
    return sum((Decimal(t) for t in totals if t is not None), Decimal(0))
