"""billing: receivables — payments (with withheld tax and its certificate) and write-offs (issue 13)

Revision ID: 0004_receipts
Revises: 0004_fx_corrections
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_receipts"
down_revision = "0004_fx_corrections"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big = sa.Integer().with_variant(sa.BigInteger(), "postgresql")
    op.create_table(
        "billing_receipts",
        sa.Column("id", big, autoincrement=True, nullable=False),
        sa.Column("document_id", big, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.String(length=40), nullable=False),
        sa.Column("withheld", sa.String(length=40), nullable=False),
        sa.Column("received_on", sa.Date(), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=False),
        sa.Column("certificate", sa.String(length=200), nullable=True),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["document_id"], ["billing_documents.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_billing_receipts_document_id", "billing_receipts", ["document_id"])


def downgrade() -> None:
    op.drop_index("ix_billing_receipts_document_id", table_name="billing_receipts")
    op.drop_table("billing_receipts")
