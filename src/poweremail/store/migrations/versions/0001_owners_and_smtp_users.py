"""Owners and their SMTP users.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("token_sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("token_rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_owners"),
        sa.UniqueConstraint("owner_id", name="uq_owners_owner_id"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "smtp_users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("owner_pk", sa.Integer, nullable=False),
        sa.Column("password_ciphertext", sa.LargeBinary, nullable=True),
        sa.Column("password_key_id", sa.Integer, nullable=True),
        sa.Column("status", sa.String(7), nullable=False),
        sa.Column("total_limit", sa.Integer, nullable=False),
        sa.Column("hourly_limit", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_smtp_users"),
        sa.UniqueConstraint("name", name="uq_smtp_users_name"),
        sa.ForeignKeyConstraint(["owner_pk"], ["owners.id"], name="fk_smtp_users_owner_pk_owners"),
        sa.CheckConstraint(
            "status IN ('Enable', 'Disable')", name="ck_smtp_users_status_is_enable_or_disable"
        ),
        sa.CheckConstraint(
            "total_limit >= 1 AND hourly_limit >= 1", name="ck_smtp_users_limits_are_positive"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_smtp_users_owner_pk", "smtp_users", ["owner_pk"])


def downgrade() -> None:
    op.drop_index("ix_smtp_users_owner_pk", table_name="smtp_users")
    op.drop_table("smtp_users")
    op.drop_table("owners")
