"""Owners: creation, token check, token rotation, listing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.domain.credentials import (
    DUMMY_TOKEN_HASH,
    hash_owner_token,
    new_owner_id,
    new_owner_token,
    owner_token_matches,
)
from poweremail.store.schema import owners, smtp_users


@dataclass(frozen=True)
class NewOwner:
    owner_id: str
    token: str  # shown once; only its hash is stored


@dataclass(frozen=True)
class OwnerSummary:
    owner_id: str
    name: str | None
    is_active: bool
    created_at: datetime
    smtp_user_count: int


def create_owner(conn: Connection, *, name: str | None = None) -> NewOwner:
    owner = NewOwner(owner_id=new_owner_id(), token=new_owner_token())
    conn.execute(
        owners.insert().values(
            owner_id=owner.owner_id,
            name=name,
            token_sha256=hash_owner_token(owner.token),
            is_active=True,
            created_at=datetime.now(UTC),
        )
    )
    return owner


def authenticate_owner(conn: Connection, *, owner_id: str, token: str) -> int | None:
    """The owner's primary key if ``token`` is this active owner's token, else ``None``.

    An unknown owner is compared against a dummy hash so both failures take the same time.
    """
    row = (
        conn.execute(
            sa.select(owners.c.id, owners.c.token_sha256, owners.c.is_active).where(
                owners.c.owner_id == owner_id
            )
        )
    ).first()
    if row is None:
        owner_token_matches(token, DUMMY_TOKEN_HASH)
        return None
    if not owner_token_matches(token, row.token_sha256) or not row.is_active:
        return None
    return int(row.id)


def rotate_owner_token(conn: Connection, *, owner_id: str) -> str | None:
    """Issue a new token (the old one stops working at once); ``None`` if there is no such owner."""
    token = new_owner_token()
    result = conn.execute(
        owners.update()
        .where(owners.c.owner_id == owner_id)
        .values(token_sha256=hash_owner_token(token), token_rotated_at=datetime.now(UTC))
    )
    return token if result.rowcount == 1 else None


def list_owners(conn: Connection) -> list[OwnerSummary]:
    live_users = (
        sa.select(sa.func.count())
        .where(smtp_users.c.owner_pk == owners.c.id, smtp_users.c.deleted_at.is_(None))
        .scalar_subquery()
    )
    rows = conn.execute(
        sa.select(
            owners.c.owner_id, owners.c.name, owners.c.is_active, owners.c.created_at, live_users
        ).order_by(owners.c.id)
    )
    return [
        OwnerSummary(
            owner_id=row.owner_id,
            name=row.name,
            is_active=bool(row.is_active),
            created_at=row.created_at,
            smtp_user_count=int(row[4]),
        )
        for row in rows
    ]
