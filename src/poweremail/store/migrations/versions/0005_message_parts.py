"""Large messages written ahead in parts, each in a transaction of its own.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from poweremail.store.schema import UtcDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("message_contents") as batch:
        batch.add_column(sa.Column("parts", sa.Integer, nullable=True))
    op.create_table(
        "message_parts",
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("queue_id", "seq", name="pk_message_parts"),
    )
    op.create_index("ix_message_parts_created_at", "message_parts", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_message_parts_created_at", table_name="message_parts")
    op.drop_table("message_parts")
    with op.batch_alter_table("message_contents") as batch:
        batch.drop_column("parts")
