"""The only billing SQL: drafts, finalized documents, gapless numbers, coverage, FX rates, closes.

Tables (SQLAlchemy Core ``metadata``; migration ``serving/migrations/versions/0002_billing_*``)::

    billing_documents   one row per invoice or credit note: draft | error -> finalized -> void.
                        ``document`` is the JSON of the finalized document, written once in the
                        transaction that assigns the number and never changed afterwards (database
                        triggers refuse updates of issued content and deletes of issued rows).
    billing_coverage    the ledger events each invoice bills: (tenant, period, seq_from < seq <= seq_to)
    billing_counters    one row per number series (prefix + year): the last number issued
    billing_fx_rates    FX rates imported with ``tokenport fx import`` (never changed once stored)
    billing_periods     per month: the ledger mark of the last run over all tenants, and the close

Gapless numbering: ``finalize`` and ``void`` increment the series' counter row in the same
transaction that writes the numbered document; a failure rolls both back, so a number is either
used by exactly one stored document or never issued. SQLite serializes writers (every transaction
starts with BEGIN IMMEDIATE, see ``metering.db``); PostgreSQL locks the counter row with
``SELECT ... FOR UPDATE`` and serializes one tenant's finalizations with an advisory lock.

Coverage: ``W(tenant, period)`` = the highest ``seq_to`` of the tenant's issued (finalized or void)
invoices for that period: every event of (tenant, period) with ``seq <= W`` is billed. A draft
records the ranges it would bill; ``finalize`` refuses a draft whose ranges no longer start at the
current ``W`` (another invoice billed some of those events since: the draft is stale).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import IntegrityError

from billing.errors import BillingError, DocumentStateError
from billing.fx import FxRate
from billing.ledger_read import SeqRange
from billing.parties import NumberSeries
from metering.tenants import to_aware, to_naive

metadata = MetaData()
_ID = Integer().with_variant(BigInteger, "postgresql")

PENDING = ("draft", "error")
ISSUED = ("finalized", "void")
_PG_TENANT_LOCK = 7_302_119  # advisory lock class: one tenant's finalizations at a time (PostgreSQL)

documents = Table(
    "billing_documents",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # invoice | credit_note
    Column("tenant_id", String(64), nullable=False),
    Column("period", String(7), nullable=False),  # YYYY-MM of the billed usage
    Column("status", String(16), nullable=False),  # draft | error | finalized | void
    Column("number", String(64), unique=True),
    Column("series", String(64)),
    Column("sequence", Integer),
    Column("document", Text),  # JSON (UTF-8); immutable once finalized
    Column("document_sha256", String(64)),
    Column("error", Text),
    Column("currency", String(3)),
    Column("subtotal", String(40)),
    Column("tax_total", String(40)),
    Column("total", String(40)),
    Column("issue_date", Date),
    Column("usage_rows", Text),  # JSON list of UsageQuantity rows (reports)
    Column("adjustment_rows", Text),
    Column("usage_digest", String(80)),
    Column("event_count", Integer, nullable=False, default=0),
    Column("original_id", _ID, ForeignKey("billing_documents.id")),  # credit note -> invoice
    Column("void_reason", Text),
    Column("voided_at", DateTime),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("finalized_at", DateTime),
)
Index("ix_billing_documents_tenant_period", documents.c.tenant_id, documents.c.period)
Index("ix_billing_documents_period", documents.c.period)
LIVE_INVOICE_WHERE = "kind = 'invoice' AND status IN ('draft', 'error', 'finalized')"
Index(
    "ux_billing_live_invoice",
    documents.c.tenant_id,
    documents.c.period,
    unique=True,
    sqlite_where=text(LIVE_INVOICE_WHERE),
    postgresql_where=text(LIVE_INVOICE_WHERE),
)

coverage = Table(
    "billing_coverage",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("document_id", _ID, ForeignKey("billing_documents.id"), nullable=False, index=True),
    Column("tenant_id", String(64), nullable=False),
    Column("period", String(7), nullable=False),
    Column("seq_from", BigInteger, nullable=False),  # exclusive
    Column("seq_to", BigInteger, nullable=False),  # inclusive
)
Index("ix_billing_coverage_tenant_period", coverage.c.tenant_id, coverage.c.period)

counters = Table(
    "billing_counters",
    metadata,
    Column("series", String(64), primary_key=True),
    Column("last_value", BigInteger, nullable=False),
)

fx_rates = Table(
    "billing_fx_rates",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("rate_date", Date, nullable=False),
    Column("base", String(3), nullable=False),
    Column("quote", String(3), nullable=False),
    Column("rate", String(40), nullable=False),
    Column("source", String(200), nullable=False),
    Column("origin", String(300), nullable=False),
    Column("imported_at", DateTime, nullable=False),
)
Index("ux_billing_fx_rate", fx_rates.c.rate_date, fx_rates.c.base, fx_rates.c.quote, unique=True)

periods = Table(
    "billing_periods",
    metadata,
    Column("period", String(7), primary_key=True),
    Column("run_mark", BigInteger, nullable=False, default=0),
    Column("run_at", DateTime),
    Column("closed_mark", BigInteger),
    Column("closed_at", DateTime),
)


class StaleDraft(DocumentStateError):
    """The draft bills ledger events that another invoice billed after the draft was built."""


class NotFound(BillingError):
    pass


@dataclass(frozen=True, slots=True)
class StoredDocument:
    id: int
    kind: str
    tenant_id: str
    period: str
    status: str
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
    """What ``save_draft`` stores: the engine's draft JSON and what it billed."""

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


Complete = Callable[[dict[str, Any], str], bytes]  # (draft JSON, number) -> finalized JSON bytes


def parse_ref(ref: str) -> tuple[str, str] | None:
    """(period, tenant) of a ``DRAFT-YYYY-MM-tenant`` reference, else None."""
    if ref.startswith("DRAFT-") and len(ref) > 14 and ref[13] == "-":
        return ref[6:13], ref[14:]
    return None


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


class BillingStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # --- reading ---------------------------------------------------------------------------
    def _query(self) -> Any:
        orig = documents.alias("orig")
        credit = documents.alias("credit")
        return (
            select(documents, orig.c.number.label("original_number"),
                   credit.c.number.label("credit_note_number"))
            .select_from(documents.outerjoin(orig, orig.c.id == documents.c.original_id)
                         .outerjoin(credit, and_(credit.c.original_id == documents.c.id,
                                                 credit.c.kind == "credit_note")))
        )

    def _load(self, conn: Connection, *conds: Any) -> list[StoredDocument]:
        rows = conn.execute(self._query().where(*conds).order_by(documents.c.id)).mappings().all()
        return [_document(r) for r in rows]

    def get(self, ref: str) -> StoredDocument:
        """A document by number or draft reference; raises NotFound."""
        draft = parse_ref(ref)
        with self._engine.connect() as conn:
            if draft is not None:
                found = self._load(conn, documents.c.period == draft[0], documents.c.tenant_id == draft[1],
                                   documents.c.kind == "invoice", documents.c.status.in_(PENDING))
            else:
                found = self._load(conn, documents.c.number == ref)
        if not found:
            raise NotFound(f"no invoice or credit note {ref!r}")
        return found[0]

    def find(self, *, tenant_id: str | None = None, period: str | None = None,
             statuses: Iterable[str] | None = None, kinds: Iterable[str] | None = None) -> list[StoredDocument]:
        conds: list[Any] = []
        if tenant_id is not None:
            conds.append(documents.c.tenant_id == tenant_id)
        if period is not None:
            conds.append(documents.c.period == period)
        if statuses is not None:
            conds.append(documents.c.status.in_(list(statuses)))
        if kinds is not None:
            conds.append(documents.c.kind.in_(list(kinds)))
        with self._engine.connect() as conn:
            return self._load(conn, *conds)

    def billed_through(self, tenant_ids: Iterable[str] | None = None) -> dict[tuple[str, str], int]:
        """W(tenant, period): the highest ledger seq billed by issued invoices, per tenant and period."""
        q = (select(coverage.c.tenant_id, coverage.c.period, func.max(coverage.c.seq_to))
             .select_from(coverage.join(documents, documents.c.id == coverage.c.document_id))
             .where(documents.c.status.in_(ISSUED))
             .group_by(coverage.c.tenant_id, coverage.c.period))
        if tenant_ids is not None:
            q = q.where(coverage.c.tenant_id.in_(list(tenant_ids)))
        with self._engine.connect() as conn:
            return {(t, p): int(w) for t, p, w in conn.execute(q).all()}

    def ranges(self, document_id: int) -> list[SeqRange]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(coverage).where(coverage.c.document_id == document_id)
                                .order_by(coverage.c.period)).mappings().all()
        return [SeqRange(r["period"], int(r["seq_from"]), int(r["seq_to"])) for r in rows]

    # --- drafts ----------------------------------------------------------------------------
    def save_draft(self, draft: Draft, now: datetime) -> StoredDocument:
        """Create or refresh the tenant's draft for the period (never touches an issued invoice)."""
        values = {
            "status": "draft", "document": draft.document.decode("utf-8"), "document_sha256": None,
            "error": None, "currency": draft.currency, "subtotal": str(draft.subtotal),
            "tax_total": str(draft.tax_total), "total": str(draft.total), "issue_date": draft.issue_date,
            "usage_rows": json.dumps(draft.usage_rows), "adjustment_rows": json.dumps(draft.adjustment_rows),
            "usage_digest": draft.usage_digest, "event_count": draft.event_count,
            "updated_at": to_naive(now),
        }
        return self._save_pending(draft.tenant_id, draft.period, values, draft.ranges, now)

    def save_error(self, tenant_id: str, period: str, message: str, now: datetime) -> StoredDocument:
        """Record why the tenant's invoice for the period cannot be built (finalize then refuses)."""
        values = {
            "status": "error", "document": None, "document_sha256": None, "error": message,
            "currency": None, "subtotal": None, "tax_total": None, "total": None, "issue_date": None,
            "usage_rows": None, "adjustment_rows": None, "usage_digest": None, "event_count": 0,
            "updated_at": to_naive(now),
        }
        return self._save_pending(tenant_id, period, values, (), now)

    def _save_pending(self, tenant_id: str, period: str, values: dict[str, Any], ranges: Sequence[SeqRange],
                      now: datetime) -> StoredDocument:
        key = and_(documents.c.tenant_id == tenant_id, documents.c.period == period,
                   documents.c.kind == "invoice")
        try:
            with self._engine.begin() as conn:
                issued = conn.execute(select(documents.c.number).where(
                    key, documents.c.status == "finalized")).scalar()
                if issued is not None:
                    raise DocumentStateError(f"{tenant_id} {period} is already invoiced ({issued})")
                doc_id = conn.execute(select(documents.c.id).where(key, documents.c.status.in_(PENDING))
                                      .with_for_update()).scalar()
                if doc_id is None:
                    doc_id = conn.execute(insert(documents).values(
                        kind="invoice", tenant_id=tenant_id, period=period, created_at=to_naive(now), **values)
                    ).inserted_primary_key[0]  # type: ignore[index]
                else:
                    conn.execute(update(documents).where(documents.c.id == doc_id).values(**values))
                    conn.execute(delete(coverage).where(coverage.c.document_id == doc_id))
                if ranges:
                    conn.execute(insert(coverage), [
                        {"document_id": doc_id, "tenant_id": tenant_id, "period": r.period,
                         "seq_from": r.lo, "seq_to": r.hi} for r in ranges])
                return self._load(conn, documents.c.id == doc_id)[0]
        except IntegrityError as exc:  # a concurrent run created the same draft first
            raise DocumentStateError(f"{tenant_id} {period}: another run saved this draft at the same time;"
                                     " run again") from exc

    def delete_pending(self, tenant_id: str, period: str) -> bool:
        """Drop a draft or error row that has nothing left to bill."""
        with self._engine.begin() as conn:
            ids = list(conn.execute(select(documents.c.id).where(
                documents.c.tenant_id == tenant_id, documents.c.period == period,
                documents.c.kind == "invoice", documents.c.status.in_(PENDING))).scalars())
            if not ids:
                return False
            conn.execute(delete(coverage).where(coverage.c.document_id.in_(ids)))
            conn.execute(delete(documents).where(documents.c.id.in_(ids)))
            return True

    # --- finalization ----------------------------------------------------------------------
    def _lock_tenant(self, conn: Connection, tenant_id: str) -> None:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:t))"),
                         {"k": _PG_TENANT_LOCK, "t": tenant_id})

    def _next_number(self, conn: Connection, series: str) -> int:
        """Increment the series' counter inside the caller's transaction (row locked until commit)."""
        ins = (postgresql.insert(counters) if conn.dialect.name == "postgresql" else sqlite.insert(counters))
        conn.execute(ins.values(series=series, last_value=0).on_conflict_do_nothing(index_elements=["series"]))
        last = conn.execute(select(counters.c.last_value).where(counters.c.series == series)
                            .with_for_update()).scalar_one()
        value = int(last) + 1
        conn.execute(update(counters).where(counters.c.series == series).values(last_value=value))
        return value

    def finalize(self, document_id: int, numbering: NumberSeries, complete: Complete,
                 now: datetime) -> StoredDocument:
        """Number a draft and store its finalized JSON, all in one transaction."""
        with self._engine.begin() as conn:
            head = conn.execute(select(documents.c.tenant_id).where(documents.c.id == document_id)).scalar()
            if head is None:
                raise NotFound(f"no document with id {document_id}")
            self._lock_tenant(conn, head)
            row = conn.execute(select(documents).where(documents.c.id == document_id)
                               .with_for_update()).mappings().one()
            if row["status"] != "draft":
                what = row["number"] or row["status"]
                raise DocumentStateError(
                    f"{row['tenant_id']} {row['period']}: only a draft can be finalized (this one is {what})"
                    + (f": {row['error']}" if row["status"] == "error" else ""))
            self._check_fresh(conn, document_id, row["tenant_id"])
            issue_date: date = row["issue_date"]
            series = f"{numbering.invoice_prefix}{issue_date.year}"
            sequence = self._next_number(conn, series)
            number = numbering.format("invoice", issue_date.year, sequence)
            final = complete(json.loads(row["document"]), number)
            conn.execute(update(documents).where(documents.c.id == document_id, documents.c.status == "draft")
                         .values(status="finalized", number=number, series=series, sequence=sequence,
                                 document=final.decode("utf-8"), document_sha256=_sha256(final),
                                 finalized_at=to_naive(now), updated_at=to_naive(now)))
            return self._load(conn, documents.c.id == document_id)[0]

    def _check_fresh(self, conn: Connection, document_id: int, tenant_id: str) -> None:
        mine = conn.execute(select(coverage).where(coverage.c.document_id == document_id)).mappings().all()
        if not mine:
            return
        wanted = {r["period"] for r in mine}
        current = dict(conn.execute(
            select(coverage.c.period, func.max(coverage.c.seq_to))
            .select_from(coverage.join(documents, documents.c.id == coverage.c.document_id))
            .where(coverage.c.tenant_id == tenant_id, coverage.c.period.in_(wanted),
                   documents.c.status.in_(ISSUED))
            .group_by(coverage.c.period)).all())
        for r in mine:
            w = int(current.get(r["period"], 0))
            if w != int(r["seq_from"]):
                raise StaleDraft(
                    f"{tenant_id}: the draft bills usage of {r['period']} after ledger seq {r['seq_from']},"
                    f" but issued invoices now cover it up to seq {w}: run `tokenport invoices run` again")

    def void(self, number: str, *, reason: str, credit_note: dict[str, Any], numbering: NumberSeries,
             complete: Complete, now: datetime) -> tuple[StoredDocument, StoredDocument]:
        """Void a finalized invoice and store its numbered credit note, in one transaction."""
        with self._engine.begin() as conn:
            head = conn.execute(select(documents.c.tenant_id).where(documents.c.number == number)).scalar()
            if head is None:
                raise NotFound(f"no invoice {number!r}")
            self._lock_tenant(conn, head)
            row = conn.execute(select(documents).where(documents.c.number == number)
                               .with_for_update()).mappings().one()
            if row["kind"] != "invoice":
                raise DocumentStateError(f"{number} is a credit note; only invoices are voided")
            if row["status"] != "finalized":
                raise DocumentStateError(f"{number} is {row['status']}; only a finalized invoice can be voided")
            issue_date = date.fromisoformat(credit_note["issue_date"])
            series = f"{numbering.credit_note_prefix}{issue_date.year}"
            sequence = self._next_number(conn, series)
            credit_number = numbering.format("credit_note", issue_date.year, sequence)
            final = complete(credit_note, credit_number)
            conn.execute(update(documents).where(documents.c.id == row["id"], documents.c.status == "finalized")
                         .values(status="void", void_reason=reason, voided_at=to_naive(now),
                                 updated_at=to_naive(now)))
            credit_id = conn.execute(insert(documents).values(
                kind="credit_note", tenant_id=row["tenant_id"], period=row["period"], status="finalized",
                number=credit_number, series=series, sequence=sequence, document=final.decode("utf-8"),
                document_sha256=_sha256(final), currency=row["currency"], subtotal=row["subtotal"],
                tax_total=row["tax_total"], total=row["total"], issue_date=issue_date,
                usage_rows=row["usage_rows"], adjustment_rows=row["adjustment_rows"],
                usage_digest=row["usage_digest"], event_count=row["event_count"], original_id=row["id"],
                void_reason=reason, created_at=to_naive(now), updated_at=to_naive(now),
                finalized_at=to_naive(now))).inserted_primary_key[0]  # type: ignore[index]
            invoice = self._load(conn, documents.c.id == row["id"])[0]
            credit = self._load(conn, documents.c.id == credit_id)[0]
            return invoice, credit

    def counter(self, series: str) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(counters.c.last_value).where(counters.c.series == series)).scalar() or 0)

    # --- periods ---------------------------------------------------------------------------
    def record_run(self, period: str, mark: int, now: datetime) -> None:
        """Remember the ledger mark of a run over all tenants (only while the period is open)."""
        with self._engine.begin() as conn:
            row = conn.execute(select(periods).where(periods.c.period == period).with_for_update()).mappings().first()
            if row is None:
                conn.execute(insert(periods).values(period=period, run_mark=mark, run_at=to_naive(now)))
            elif row["closed_at"] is None:
                conn.execute(update(periods).where(periods.c.period == period)
                             .values(run_mark=max(mark, int(row["run_mark"])), run_at=to_naive(now)))

    def close_period(self, period: str, now: datetime) -> int:
        """Mark the period closed for every tenant without a pending draft; returns the close mark."""
        with self._engine.begin() as conn:
            row = conn.execute(select(periods).where(periods.c.period == period).with_for_update()).mappings().first()
            if row is None:
                conn.execute(insert(periods).values(period=period, run_mark=0, closed_mark=0,
                                                    closed_at=to_naive(now)))
                return 0
            if row["closed_at"] is None:
                conn.execute(update(periods).where(periods.c.period == period)
                             .values(closed_mark=row["run_mark"], closed_at=to_naive(now)))
                return int(row["run_mark"])
            return int(row["closed_mark"] or 0)

    def was_run(self, period: str) -> bool:
        """Whether a run over all tenants was recorded for the period."""
        with self._engine.connect() as conn:
            return conn.execute(select(periods.c.run_at).where(periods.c.period == period)).scalar() is not None

    def closed_periods(self) -> dict[str, int]:
        """Closed period -> close mark (every event of a tenant without rows there is above it)."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(periods.c.period, periods.c.closed_mark)
                                .where(periods.c.closed_at.is_not(None))).all()
        return {p: int(m or 0) for p, m in rows}

    def invoice_states(self, periods_: Iterable[str]) -> dict[tuple[str, str], set[str]]:
        """(tenant, period) -> statuses of its invoices in those periods."""
        wanted = list(periods_)
        if not wanted:
            return {}
        with self._engine.connect() as conn:
            rows = conn.execute(select(documents.c.tenant_id, documents.c.period, documents.c.status)
                                .where(documents.c.kind == "invoice", documents.c.period.in_(wanted))).all()
        out: dict[tuple[str, str], set[str]] = {}
        for t, p, s in rows:
            out.setdefault((t, p), set()).add(s)
        return out

    def invoiced_periods(self) -> set[str]:
        with self._engine.connect() as conn:
            return set(conn.execute(select(documents.c.period).where(
                documents.c.kind == "invoice", documents.c.status.in_(ISSUED)).distinct()).scalars())

    # --- FX rates --------------------------------------------------------------------------
    def fx_rates(self) -> list[FxRate]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(fx_rates).order_by(fx_rates.c.rate_date, fx_rates.c.base,
                                                          fx_rates.c.quote)).mappings().all()
        return [FxRate(r["rate_date"], r["base"], r["quote"], Decimal(r["rate"]), r["source"]) for r in rows]

    def add_fx_rates(self, rates: Sequence[FxRate], *, origin: str, now: datetime) -> int:
        """Store rates not stored yet (same date, pair and rate: skipped); returns how many were new.

        The caller has checked that no rate contradicts a stored or configured one.
        """
        added = 0
        with self._engine.begin() as conn:
            for r in rates:
                found = conn.execute(select(fx_rates.c.rate).where(
                    fx_rates.c.rate_date == r.date, fx_rates.c.base == r.base, fx_rates.c.quote == r.quote)).scalar()
                if found is not None:
                    if Decimal(found) != r.rate:
                        raise DocumentStateError(f"{r.base}/{r.quote} {r.date}: a different rate {found} is stored")
                    continue
                conn.execute(insert(fx_rates).values(rate_date=r.date, base=r.base, quote=r.quote,
                                                     rate=format(r.rate, "f"), source=r.source, origin=origin,
                                                     imported_at=to_naive(now)))
                added += 1
        return added


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _document(r: RowMapping) -> StoredDocument:
    raw = r["document"]
    return StoredDocument(
        id=int(r["id"]), kind=r["kind"], tenant_id=r["tenant_id"], period=r["period"], status=r["status"],
        number=r["number"], document_bytes=raw.encode("utf-8") if raw else None, document_sha256=r["document_sha256"],
        error=r["error"], currency=r["currency"], subtotal=_dec(r["subtotal"]), tax_total=_dec(r["tax_total"]),
        total=_dec(r["total"]), issue_date=r["issue_date"],
        usage_rows=json.loads(r["usage_rows"]) if r["usage_rows"] else [],
        adjustment_rows=json.loads(r["adjustment_rows"]) if r["adjustment_rows"] else [],
        usage_digest=r["usage_digest"], event_count=int(r["event_count"] or 0),
        original_number=r["original_number"], credit_note_number=r["credit_note_number"],
        void_reason=r["void_reason"], created_at=_aware(r["created_at"]), updated_at=_aware(r["updated_at"]),
        finalized_at=to_aware(r["finalized_at"]), voided_at=to_aware(r["voided_at"]),
    )


def _aware(value: datetime) -> datetime:
    out = to_aware(value)
    assert out is not None
    return out


