"""usage_events.tenant_seq: each event's position among its tenant's events (the tenant API's cursor)

Revision ID: 0003_tenant_seq
Revises: 0002_billing

Existing events get theirs in ledger order (seq); the hash chain does not cover it, so no hash changes.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_tenant_seq"
down_revision = "0002_billing"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant_seq", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE usage_events SET tenant_seq = numbered.n FROM ("
        " SELECT seq, ROW_NUMBER() OVER (PARTITION BY tenant_id ORDER BY seq) AS n FROM usage_events"
        ") AS numbered WHERE usage_events.seq = numbered.seq"
    )
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.alter_column("tenant_seq", existing_type=sa.BigInteger(), nullable=False)
        batch_op.create_index("ux_usage_tenant_seq", ["tenant_id", "tenant_seq"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.drop_index("ux_usage_tenant_seq")
        batch_op.drop_column("tenant_seq")
