"""billing: documents, coverage, gapless counters, imported FX rates, period closes

Revision ID: 0002_billing
Revises: 0002_metering
Create Date: 2026-11-23 22:00:00

Issued documents are protected by triggers (SQLite and PostgreSQL): once a row is finalized or
void its content (document JSON, number, amounts, usage) cannot change, it cannot go back to
draft, and neither it nor its coverage rows can be deleted. Only finalized -> void is allowed.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_billing"
down_revision = "0002_metering"
branch_labels = None
depends_on = None

_ID = sa.Integer().with_variant(sa.BigInteger(), "postgresql")
_LIVE = "kind = 'invoice' AND status IN ('draft', 'error', 'finalized')"
_CONTENT = (
    "kind",
    "tenant_id",
    "period",
    "number",
    "series",
    "sequence",
    "document",
    "document_sha256",
    "currency",
    "subtotal",
    "tax_total",
    "total",
    "issue_date",
    "usage_rows",
    "adjustment_rows",
    "usage_digest",
    "event_count",
    "original_id",
    "finalized_at",
)
_MESSAGE = "issued billing documents are immutable"


def _sqlite_triggers() -> list[str]:
    changed = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in _CONTENT)
    return [
        f"""CREATE TRIGGER billing_documents_immutable BEFORE UPDATE ON billing_documents
        WHEN OLD.status IN ('finalized', 'void') AND ({changed}
              OR NEW.status NOT IN ('finalized', 'void') OR (OLD.status = 'void' AND NEW.status <> 'void'))
        BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END""",
        f"""CREATE TRIGGER billing_documents_undeletable BEFORE DELETE ON billing_documents
        WHEN OLD.status IN ('finalized', 'void')
        BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END""",
        f"""CREATE TRIGGER billing_coverage_immutable BEFORE UPDATE ON billing_coverage
        WHEN (SELECT status FROM billing_documents WHERE id = OLD.document_id) IN ('finalized', 'void')
        BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END""",
        f"""CREATE TRIGGER billing_coverage_undeletable BEFORE DELETE ON billing_coverage
        WHEN (SELECT status FROM billing_documents WHERE id = OLD.document_id) IN ('finalized', 'void')
        BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END""",
    ]


def _postgresql_triggers() -> list[str]:
    changed = " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in _CONTENT)
    return [
        f"""CREATE FUNCTION billing_documents_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF OLD.status IN ('finalized', 'void') THEN
            IF TG_OP = 'DELETE' OR {changed} OR NEW.status NOT IN ('finalized', 'void')
               OR (OLD.status = 'void' AND NEW.status <> 'void') THEN
              RAISE EXCEPTION '{_MESSAGE}';
            END IF;
          END IF;
          IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
          RETURN NEW;
        END $$""",
        """CREATE TRIGGER billing_documents_immutable BEFORE UPDATE OR DELETE ON billing_documents
        FOR EACH ROW EXECUTE FUNCTION billing_documents_guard()""",
        f"""CREATE FUNCTION billing_coverage_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF (SELECT status FROM billing_documents WHERE id = OLD.document_id) IN ('finalized', 'void') THEN
            RAISE EXCEPTION '{_MESSAGE}';
          END IF;
          IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
          RETURN NEW;
        END $$""",
        """CREATE TRIGGER billing_coverage_immutable BEFORE UPDATE OR DELETE ON billing_coverage
        FOR EACH ROW EXECUTE FUNCTION billing_coverage_guard()""",
    ]


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("billing_documents"):
        return  # applied while this revision was one of three heads off 0001 (serving/db_schema.py)
    op.create_table(
        "billing_documents",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("number", sa.String(length=64), nullable=True),
        sa.Column("series", sa.String(length=64), nullable=True),
        sa.Column("sequence", sa.Integer(), nullable=True),
        sa.Column("document", sa.Text(), nullable=True),
        sa.Column("document_sha256", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("subtotal", sa.String(length=40), nullable=True),
        sa.Column("tax_total", sa.String(length=40), nullable=True),
        sa.Column("total", sa.String(length=40), nullable=True),
        sa.Column("issue_date", sa.Date(), nullable=True),
        sa.Column("usage_rows", sa.Text(), nullable=True),
        sa.Column("adjustment_rows", sa.Text(), nullable=True),
        sa.Column("usage_digest", sa.String(length=80), nullable=True),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("original_id", _ID, nullable=True),
        sa.Column("void_reason", sa.Text(), nullable=True),
        sa.Column("voided_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finalized_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["original_id"], ["billing_documents.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("number"),
    )
    with op.batch_alter_table("billing_documents", schema=None) as batch_op:
        batch_op.create_index("ix_billing_documents_period", ["period"], unique=False)
        batch_op.create_index("ix_billing_documents_tenant_period", ["tenant_id", "period"], unique=False)
        batch_op.create_index(
            "ux_billing_live_invoice",
            ["tenant_id", "period"],
            unique=True,
            sqlite_where=sa.text(_LIVE),
            postgresql_where=sa.text(_LIVE),
        )

    op.create_table(
        "billing_coverage",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("document_id", _ID, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("seq_from", sa.BigInteger(), nullable=False),
        sa.Column("seq_to", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["document_id"], ["billing_documents.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("billing_coverage", schema=None) as batch_op:
        batch_op.create_index("ix_billing_coverage_document_id", ["document_id"], unique=False)
        batch_op.create_index("ix_billing_coverage_tenant_period", ["tenant_id", "period"], unique=False)

    op.create_table(
        "billing_counters",
        sa.Column("series", sa.String(length=64), nullable=False),
        sa.Column("last_value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("series"),
    )
    op.create_table(
        "billing_fx_rates",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("rate_date", sa.Date(), nullable=False),
        sa.Column("base", sa.String(length=3), nullable=False),
        sa.Column("quote", sa.String(length=3), nullable=False),
        sa.Column("rate", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("origin", sa.String(length=300), nullable=False),
        sa.Column("imported_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("billing_fx_rates", schema=None) as batch_op:
        batch_op.create_index("ux_billing_fx_rate", ["rate_date", "base", "quote"], unique=True)

    op.create_table(
        "billing_periods",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("run_mark", sa.BigInteger(), nullable=False),
        sa.Column("run_at", sa.DateTime(), nullable=True),
        sa.Column("closed_mark", sa.BigInteger(), nullable=True),
        sa.Column("closed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("period"),
    )
    dialect = op.get_bind().dialect.name
    triggers = (
        _postgresql_triggers()
        if dialect == "postgresql"
        else _sqlite_triggers()
        if dialect == "sqlite"
        else []
    )
    for statement in triggers:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS billing_coverage_immutable ON billing_coverage")
        op.execute("DROP TRIGGER IF EXISTS billing_documents_immutable ON billing_documents")
        op.execute("DROP FUNCTION IF EXISTS billing_coverage_guard()")
        op.execute("DROP FUNCTION IF EXISTS billing_documents_guard()")
    elif dialect == "sqlite":
        for name in (
            "billing_coverage_undeletable",
            "billing_coverage_immutable",
            "billing_documents_undeletable",
            "billing_documents_immutable",
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("billing_periods")
    with op.batch_alter_table("billing_fx_rates", schema=None) as batch_op:
        batch_op.drop_index("ux_billing_fx_rate")
    op.drop_table("billing_fx_rates")
    op.drop_table("billing_counters")
    with op.batch_alter_table("billing_coverage", schema=None) as batch_op:
        batch_op.drop_index("ix_billing_coverage_tenant_period")
        batch_op.drop_index("ix_billing_coverage_document_id")
    op.drop_table("billing_coverage")
    with op.batch_alter_table("billing_documents", schema=None) as batch_op:
        batch_op.drop_index("ux_billing_live_invoice")
        batch_op.drop_index("ix_billing_documents_tenant_period")
        batch_op.drop_index("ix_billing_documents_period")
    op.drop_table("billing_documents")
