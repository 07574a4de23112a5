"""guardrails: limit policies (rate limits, budgets, per-tenant caps), audit log, content log

Revision ID: 0002_guardrails
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_guardrails"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("limit_policies"):
        return  # applied while this revision was one of three heads off 0001 (serving/db_schema.py)
    op.create_table(
        "limit_policies",
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("scope_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.BigInteger(), nullable=True),
        sa.Column("budget_unit", sa.String(length=8), nullable=True),
        sa.Column("budget_amount", sa.String(length=40), nullable=True),
        sa.Column("budget_period", sa.String(length=8), nullable=True),
        sa.Column("budget_start", sa.DateTime(), nullable=True),
        sa.Column("max_tokens", sa.Integer(), nullable=True),
        sa.Column("max_prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("request_timeout_s", sa.Integer(), nullable=True),
        sa.Column("content_logging", sa.Boolean(), nullable=True),
        sa.Column("content_retention_days", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "scope_id"),
    )
    with op.batch_alter_table("limit_policies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_limit_policies_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column(
            "id", sa.Integer().with_variant(sa.BigInteger(), "postgresql"), autoincrement=True, nullable=False
        ),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("client", sa.String(length=200), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=True),
        sa.Column("tenant_id", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "content_log",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("completion", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("request_id"),
    )
    with op.batch_alter_table("content_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_content_log_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_content_log_tenant_id"), ["tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("content_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_content_log_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_content_log_expires_at"))
    op.drop_table("content_log")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))
    op.drop_table("audit_log")
    with op.batch_alter_table("limit_policies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_limit_policies_tenant_id"))
    op.drop_table("limit_policies")
