"""usage events: the prompt's and the completion's characters and UTF-8 bytes (issue 15)

Revision ID: 0003_text_size
Revises: 0003_batches

Nullable: the events recorded before carry none (and keep their hashes, metering/event_codec.py).
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_text_size"
down_revision = "0003_batches"
branch_labels = None
depends_on = None

COLUMNS = ("prompt_chars", "prompt_bytes", "completion_chars", "completion_bytes")


def upgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
