"""The rolling hour by index lookups: each message records the sender's running total.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from poweremail.store.schema import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("smtp_users") as batch:
        batch.add_column(sa.Column("last_accepted_at", UtcDateTime(), nullable=True))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("sent_total_after", sa.BigInteger, nullable=False, server_default="0"))
    # Messages queued before this revision: their running totals, in the order they were queued.
    op.execute(
        "UPDATE messages SET sent_total_after = (SELECT SUM(earlier.recipient_count) FROM messages AS earlier"
        " WHERE earlier.smtp_user_id = messages.smtp_user_id AND earlier.id <= messages.id)"
    )
    op.execute(
        "UPDATE smtp_users SET last_accepted_at ="
        " (SELECT MAX(accepted_at) FROM messages WHERE messages.smtp_user_id = smtp_users.id)"
    )
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("sent_total_after", server_default=None)
    op.create_index(
        "ix_messages_smtp_user_id_sent_total_after", "messages", ["smtp_user_id", "sent_total_after"]
    )


def downgrade() -> None:
    op.drop_index("ix_messages_smtp_user_id_sent_total_after", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("sent_total_after")
    with op.batch_alter_table("smtp_users") as batch:
        batch.drop_column("last_accepted_at")
