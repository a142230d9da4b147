"""Accepted messages, their recipients and contents; usage counters on SMTP users.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("smtp_users") as batch:
        batch.add_column(sa.Column("sent_total", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("credential_version", sa.Integer, nullable=False, server_default="1"))
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("smtp_user_id", sa.Integer, nullable=False),
        sa.Column("mail_from", sa.String(512), nullable=False),
        sa.Column("recipient_count", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.UniqueConstraint("queue_id", name="uq_messages_queue_id"),
        sa.ForeignKeyConstraint(
            ["smtp_user_id"], ["smtp_users.id"], name="fk_messages_smtp_user_id_smtp_users"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_messages_smtp_user_id_accepted_at", "messages", ["smtp_user_id", "accepted_at"])
    op.create_table(
        "message_contents",
        sa.Column("message_id", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("message_id", name="pk_message_contents"),
        sa.ForeignKeyConstraint(
            ["message_id"], ["messages.id"], name="fk_message_contents_message_id_messages"
        ),
    )
    op.create_table(
        "recipients",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("message_id", sa.Integer, nullable=False),
        sa.Column("address", sa.String(512), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="queued"),
        sa.PrimaryKeyConstraint("id", name="pk_recipients"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], name="fk_recipients_message_id_messages"),
        sa.CheckConstraint(
            "state IN ('queued', 'deferred', 'delivered', 'bounced')", name="ck_recipients_state_is_known"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_recipients_message_id", "recipients", ["message_id"])


def downgrade() -> None:
    op.drop_index("ix_recipients_message_id", table_name="recipients")
    op.drop_table("recipients")
    op.drop_table("message_contents")
    op.drop_index("ix_messages_smtp_user_id_accepted_at", table_name="messages")
    op.drop_table("messages")
    with op.batch_alter_table("smtp_users") as batch:
        batch.drop_column("credential_version")
        batch.drop_column("sent_total")
