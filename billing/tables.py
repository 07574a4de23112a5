"""billing's tables (SQLAlchemy Core; migrations ``serving/migrations/versions/0002_billing_*``).

::

    billing_documents   one row per invoice or credit note; ``status`` follows billing/lifecycle.py.
                        ``document`` is the JSON of the finalized document, written once in the
                        transaction that assigns the number and never changed afterwards (database
                        triggers refuse updates of issued content and deletes of issued rows).
    billing_coverage    the ledger events each invoice bills: (tenant, period, seq_from < seq <= seq_to)
    billing_counters    one row per number series (prefix + year): the last number issued
    billing_fx_rates    FX rates imported with ``tokenport fx import`` (never changed once stored)
    billing_periods     per month: the ledger mark of the last run over all tenants, and the close
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()
_ID = Integer().with_variant(BigInteger, "postgresql")

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

# Issued documents' renderings, archived when first produced (at finalization, and at void for the
# VOID-marked one): PDF and UBL are served from here, byte for byte (migration 0004_document_files).
document_files = Table(
    "billing_document_files",
    metadata,
    Column("document_id", _ID, primary_key=True),
    Column("format", String(8), primary_key=True),  # pdf | ubl
    Column("status", String(16), primary_key=True),  # the document's status rendered (finalized | void)
    Column("sha256", String(64), nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

# A stored (or shipped) FX rate found wrong is corrected by a superseding row with a reason, never
# edited: the latest correction of a (date, base, quote) is the rate billing uses from then on;
# documents already issued keep the rate they recorded (migration 0004_fx_corrections).
fx_corrections = Table(
    "billing_fx_corrections",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("rate_date", Date, nullable=False),
    Column("base", String(3), nullable=False),
    Column("quote", String(3), nullable=False),
    Column("rate", String(40), nullable=False),
    Column("source", String(200), nullable=False),
    Column("supersedes", String(40), nullable=False),  # the rate it replaces, as it was
    Column("reason", Text, nullable=False),
    Column("corrected_at", DateTime, nullable=False),
)

# Receivables: what was received against an issued invoice (payments, with any tax the buyer withheld
# and its certificate) and write-offs. Append-only rows (migration 0004_payments).
receipts = Table(
    "billing_receipts",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("document_id", _ID, ForeignKey("billing_documents.id"), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # payment | write_off
    Column("amount", String(40), nullable=False),  # received (payment) or written off, document currency
    Column("withheld", String(40), nullable=False, default="0"),  # tax the buyer withheld (WHT)
    Column("received_on", Date, nullable=False),
    Column("reference", String(200), nullable=False),  # bank reference, or the write-off's reason
    Column("certificate", String(200)),  # the WHT certificate
    Column("recorded_at", DateTime, nullable=False),
)


# Prepaid credit (billing/credits.py): grants (a top-up, paid with its numbered receipt, or promotional)
# and their use on invoices (negative amounts naming the invoice). Append-only: the balance is the sum.
credits = Table(
    "billing_credits",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("currency", String(3), nullable=False),
    Column("kind", String(16), nullable=False),  # paid | promotional
    Column("amount", String(40), nullable=False),  # + granted, - applied to an invoice
    Column("number", String(64), unique=True),  # a paid grant's receipt number (gapless series)
    Column("document_id", _ID, ForeignKey("billing_documents.id")),  # the invoice it was applied to
    Column("reference", String(200), nullable=False),  # the bank reference, campaign, or invoice number
    Column("expires_on", Date),  # promotional credit: unused after this day
    Column("recorded_at", DateTime, nullable=False),
)
