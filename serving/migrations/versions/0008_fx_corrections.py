"""billing: FX rates corrected by superseding rows with a reason (issue 13, guards)

Revision ID: 0004_fx_corrections
Revises: 0004_document_files
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_fx_corrections"
down_revision = "0004_document_files"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billing_fx_corrections",
        sa.Column(
            "id", sa.Integer().with_variant(sa.BigInteger(), "postgresql"), autoincrement=True, nullable=False
        ),
        sa.Column("rate_date", sa.Date(), nullable=False),
        sa.Column("base", sa.String(length=3), nullable=False),
        sa.Column("quote", sa.String(length=3), nullable=False),
        sa.Column("rate", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("supersedes", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("corrected_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("billing_fx_corrections")
