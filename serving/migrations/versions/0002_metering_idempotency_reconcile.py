"""metering: idempotency keys, reconcile snapshots

Revision ID: 0002_metering
Revises: 0002_guardrails
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_metering"
down_revision = "0002_guardrails"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("idempotency_keys"):
        return  # applied while this revision was one of three heads off 0001 (serving/db_schema.py)
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=24), nullable=True),
        sa.Column("response", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "key"),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idempotency_keys_expires_at"), ["expires_at"], unique=False)

    op.create_table(
        "metering_snapshots",
        sa.Column(
            "id", sa.Integer().with_variant(sa.BigInteger(), "postgresql"), autoincrement=True, nullable=False
        ),
        sa.Column("taken_at", sa.DateTime(), nullable=False),
        sa.Column("worker_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("counters_epoch", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("ledger_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("metering_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            "ix_metering_snapshots_worker", ["worker_id", "model", "taken_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("metering_snapshots", schema=None) as batch_op:
        batch_op.drop_index("ix_metering_snapshots_worker")
    op.drop_table("metering_snapshots")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_expires_at"))
    op.drop_table("idempotency_keys")
