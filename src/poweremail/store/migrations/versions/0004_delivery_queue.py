"""The delivery queue: per-recipient attempts, due times, last replies and leases; bounce reports.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from poweremail.store.schema import UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_PENDING = "state IN ('queued', 'deferred')"


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("smtp_user_id", existing_type=sa.Integer, nullable=True)
        batch.add_column(sa.Column("bounce_of", sa.Integer, nullable=True))
        batch.create_foreign_key("fk_messages_bounce_of_messages", "messages", ["bounce_of"], ["id"])
    with op.batch_alter_table("recipients") as batch:
        batch.add_column(sa.Column("domain", sa.String(255), nullable=False, server_default=""))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", UtcDateTime(), nullable=True))
        batch.add_column(sa.Column("last_attempt_at", UtcDateTime(), nullable=True))
        batch.add_column(sa.Column("last_reply", sa.String(1000), nullable=True))
        batch.add_column(sa.Column("remote_mta", sa.String(255), nullable=True))
        batch.add_column(sa.Column("locked_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("locked_until", UtcDateTime(), nullable=True))
        batch.create_check_constraint("attempts_not_negative", "attempts >= 0")
    # Recipients queued before this revision: due at once; their domain from their address.
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, address FROM recipients")).all()
    for recipient_id, address in rows:
        conn.execute(
            sa.text("UPDATE recipients SET domain = :domain WHERE id = :id"),
            {"domain": address.rpartition("@")[2].lower(), "id": recipient_id},
        )
    op.execute(
        "UPDATE recipients SET next_attempt_at ="
        " (SELECT accepted_at FROM messages WHERE messages.id = recipients.message_id)"
    )
    with op.batch_alter_table("recipients") as batch:
        batch.alter_column("domain", existing_type=sa.String(255), server_default=None)
        batch.alter_column("next_attempt_at", existing_type=UtcDateTime(), nullable=False)
    op.create_index(
        "ix_recipients_due",
        "recipients",
        ["next_attempt_at"],
        sqlite_where=sa.text(_PENDING),
        postgresql_where=sa.text(_PENDING),
    )


def downgrade() -> None:
    op.drop_index("ix_recipients_due", table_name="recipients")
    with op.batch_alter_table("recipients") as batch:
        batch.drop_constraint("ck_recipients_attempts_not_negative", type_="check")
        for column in (
            "locked_until",
            "locked_by",
            "remote_mta",
            "last_reply",
            "last_attempt_at",
            "next_attempt_at",
            "attempts",
            "domain",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("messages") as batch:
        batch.drop_constraint("fk_messages_bounce_of_messages", type_="foreignkey")
        batch.drop_column("bounce_of")
        batch.alter_column("smtp_user_id", existing_type=sa.Integer, nullable=False)
