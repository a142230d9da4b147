"""SMTP users: the rows behind addSmtp, editSmtp, resetSmtpPassword, listSmtp and deleteSmtp.

Every function that takes ``owner_pk`` only ever sees that owner's users (owner isolation, SPEC §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from poweremail.domain.credentials import new_smtp_password, new_smtp_user_name
from poweremail.domain.limits import HOURLY_WINDOW
from poweremail.keyring import Keyring
from poweremail.store.schema import messages, owners, smtp_users

# A fresh random name collides with an existing one with probability (users / 9e9); five draws in a
# row colliding means something else is wrong.
_NAME_ATTEMPTS = 5


class NameSpaceExhaustedError(RuntimeError):
    pass


@dataclass(frozen=True)
class SmtpUserListing:
    name: str
    password: str
    status: str
    total_limit: int
    hourly_limit: int
    sent_total: int
    sent_last_hour: int


def _insert_ignoring_name_conflict(conn: Connection) -> sa.Insert:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    return insert(smtp_users).on_conflict_do_nothing(index_elements=["name"])


def create_smtp_user(
    conn: Connection, *, owner_pk: int, keyring: Keyring, total_limit: int, hourly_limit: int
) -> tuple[str, str]:
    """Create an enabled SMTP user; return its ``(name, password)``."""
    password = new_smtp_password()
    now = datetime.now(UTC)
    for _ in range(_NAME_ATTEMPTS):
        name = new_smtp_user_name()
        key_id, ciphertext = keyring.encrypt_password(password, smtp_user_name=name)
        # ON CONFLICT DO NOTHING rather than catching IntegrityError: on PostgreSQL an error would
        # abort the whole transaction; here a taken name simply inserts no row and we draw again.
        result = conn.execute(
            _insert_ignoring_name_conflict(conn)
            .values(
                name=name,
                owner_pk=owner_pk,
                password_ciphertext=ciphertext,
                password_key_id=key_id,
                status="Enable",
                total_limit=total_limit,
                hourly_limit=hourly_limit,
                created_at=now,
                updated_at=now,
            )
            .returning(smtp_users.c.id)
        )
        if result.first() is not None:
            return name, password
    raise NameSpaceExhaustedError("could not draw an unused SMTP user name")


def find_smtp_user_id(conn: Connection, *, owner_pk: int, name: str) -> int | None:
    """The id of this owner's live SMTP user called ``name``; ``None`` for another owner's or none."""
    return conn.scalar(
        sa.select(smtp_users.c.id).where(
            smtp_users.c.name == name,
            smtp_users.c.owner_pk == owner_pk,
            smtp_users.c.deleted_at.is_(None),
        )
    )


def update_smtp_user(
    conn: Connection,
    *,
    smtp_user_id: int,
    total_limit: int,
    hourly_limit: int | None = None,
    status: str | None = None,
) -> None:
    values: dict[str, object] = {"total_limit": total_limit, "updated_at": datetime.now(UTC)}
    if hourly_limit is not None:
        values["hourly_limit"] = hourly_limit
    if status is not None:
        values["status"] = status
    conn.execute(smtp_users.update().where(smtp_users.c.id == smtp_user_id).values(**values))


def reset_smtp_password(conn: Connection, *, smtp_user_id: int, name: str, keyring: Keyring) -> str:
    password = new_smtp_password()
    key_id, ciphertext = keyring.encrypt_password(password, smtp_user_name=name)
    conn.execute(
        smtp_users.update()
        .where(smtp_users.c.id == smtp_user_id)
        .values(
            password_ciphertext=ciphertext,
            password_key_id=key_id,
            credential_version=smtp_users.c.credential_version + 1,  # ends open SMTP sessions' rights
            updated_at=datetime.now(UTC),
        )
    )
    return password


def delete_smtp_user(conn: Connection, *, smtp_user_id: int) -> None:
    """Soft delete: the row stays so the name is never issued again; the password is erased."""
    now = datetime.now(UTC)
    conn.execute(
        smtp_users.update()
        .where(smtp_users.c.id == smtp_user_id)
        .values(
            deleted_at=now,
            updated_at=now,
            status="Disable",
            password_ciphertext=None,
            password_key_id=None,
        )
    )


# The same lookup as the SMTP server's (store/messages.py): the running total an hour ago.
_TOTAL_AN_HOUR_AGO = (
    sa.select(messages.c.sent_total_after)
    .where(messages.c.smtp_user_id == smtp_users.c.id, messages.c.accepted_at <= sa.bindparam("hour_ago"))
    .order_by(messages.c.accepted_at.desc())
    .limit(1)
    .scalar_subquery()
)
# Built once (see owners.py).
_LISTING = (
    sa.select(
        smtp_users.c.name,
        smtp_users.c.password_ciphertext,
        smtp_users.c.password_key_id,
        smtp_users.c.status,
        smtp_users.c.total_limit,
        smtp_users.c.hourly_limit,
        smtp_users.c.sent_total,
        (smtp_users.c.sent_total - sa.func.coalesce(_TOTAL_AN_HOUR_AGO, 0)).label("sent_last_hour"),
    )
    .where(smtp_users.c.owner_pk == sa.bindparam("owner_pk"), smtp_users.c.deleted_at.is_(None))
    .order_by(smtp_users.c.id)
)


def list_smtp_users(conn: Connection, *, owner_pk: int, keyring: Keyring) -> list[SmtpUserListing]:
    """This owner's live SMTP users, oldest first, with their passwords and usage."""
    rows = conn.execute(_LISTING, {"owner_pk": owner_pk, "hour_ago": datetime.now(UTC) - HOURLY_WINDOW})
    return [
        SmtpUserListing(
            name=row.name,
            password=keyring.decrypt_password(
                row.password_key_id, row.password_ciphertext, smtp_user_name=row.name
            ),
            status=row.status,
            total_limit=row.total_limit,
            hourly_limit=row.hourly_limit,
            sent_total=row.sent_total,
            sent_last_hour=row.sent_last_hour,
        )
        for row in rows
    ]


def reencrypt_passwords(conn: Connection, *, keyring: Keyring, batch: int = 500) -> int:
    """Move up to ``batch`` passwords not under the primary key onto it; return how many moved."""
    rows = (
        conn.execute(
            sa.select(
                smtp_users.c.id,
                smtp_users.c.name,
                smtp_users.c.password_key_id,
                smtp_users.c.password_ciphertext,
            )
            .where(
                smtp_users.c.password_ciphertext.is_not(None),
                smtp_users.c.password_key_id != keyring.primary,
            )
            .limit(batch)
        )
    ).all()
    for row in rows:
        password = keyring.decrypt_password(
            row.password_key_id, row.password_ciphertext, smtp_user_name=row.name
        )
        key_id, ciphertext = keyring.encrypt_password(password, smtp_user_name=row.name)
        conn.execute(
            smtp_users.update()
            .where(smtp_users.c.id == row.id)
            .values(password_ciphertext=ciphertext, password_key_id=key_id)
        )
    return len(rows)


@dataclass(frozen=True)
class LoginCandidate:
    smtp_user_id: int
    name: str
    password: str
    credential_version: int
    may_send: bool


_LOGIN = (
    sa.select(
        smtp_users.c.id,
        smtp_users.c.password_ciphertext,
        smtp_users.c.password_key_id,
        smtp_users.c.status,
        smtp_users.c.credential_version,
        owners.c.is_active,
    )
    .join(owners, owners.c.id == smtp_users.c.owner_pk)
    .where(smtp_users.c.name == sa.bindparam("name"), smtp_users.c.deleted_at.is_(None))
)


def find_login(conn: Connection, *, name: str, keyring: Keyring) -> LoginCandidate | None:
    """The live SMTP user called ``name``, with its decrypted password, for the SMTP AUTH check."""
    if "\x00" in name:  # AUTH LOGIN can carry one; PostgreSQL text cannot, so no name has one
        return None
    row = conn.execute(_LOGIN, {"name": name}).first()
    if row is None:
        return None
    return LoginCandidate(
        smtp_user_id=row.id,
        name=name,
        password=keyring.decrypt_password(row.password_key_id, row.password_ciphertext, smtp_user_name=name),
        credential_version=row.credential_version,
        may_send=row.status == "Enable" and bool(row.is_active),
    )
