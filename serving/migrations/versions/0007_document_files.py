"""billing: issued documents' PDF and UBL archived when first rendered (issue 13)

Revision ID: 0004_document_files
Revises: 0004_stored_responses
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_document_files"
down_revision = "0004_stored_responses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billing_document_files",
        sa.Column("document_id", sa.Integer().with_variant(sa.BigInteger(), "postgresql"), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("document_id", "format", "status"),
    )


def downgrade() -> None:
    op.drop_table("billing_document_files")
