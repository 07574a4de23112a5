"""billing: prepaid credit — grants (paid with a numbered receipt, or promotional) and their use on
invoices (issue 13)

Revision ID: 0004_credits
Revises: 0004_receipts
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_credits"
down_revision = "0004_receipts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big = sa.Integer().with_variant(sa.BigInteger(), "postgresql")
    op.create_table(
        "billing_credits",
        sa.Column("id", big, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.String(length=40), nullable=False),
        sa.Column("number", sa.String(length=64), nullable=True),
        sa.Column("document_id", big, nullable=True),
        sa.Column("reference", sa.String(length=200), nullable=False),
        sa.Column("expires_on", sa.Date(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["document_id"], ["billing_documents.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("number"),
    )
    op.create_index("ix_billing_credits_tenant_id", "billing_credits", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_billing_credits_tenant_id", table_name="billing_credits")
    op.drop_table("billing_credits")
