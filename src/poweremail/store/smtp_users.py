"""SMTP users: the rows behind addSmtp, editSmtp, resetSmtpPassword, listSmtp and deleteSmtp.

Every function that takes ``owner_pk`` only ever sees that owner's users (owner isolation, SPEC §2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from poweremail.domain.credentials import (
    DUMMY_TOKEN_HASH,
    new_smtp_password,
    new_smtp_user_name,
    owner_token_matches,
)
from poweremail.domain.limits import HOURLY_WINDOW
from poweremail.keyring import Keyring
from poweremail.store.schema import UtcDateTime, messages, owners, smtp_users

# A fresh random name collides with an existing one with probability (users / 9e9); five draws in a
# row colliding means something else is wrong.
_NAME_ATTEMPTS = 5


class NameSpaceExhaustedError(RuntimeError):
    pass


class SmtpUserListing(NamedTuple):
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
# listSmtp in one statement: the owner's token hash and, beside it, each of its live users with the
# usage (a LEFT JOIN, so an owner with no users is still one row, of NULL users). Measured: two
# statements (authenticate, then list) through SQLAlchemy's execute were ~40% of listSmtp's CPU.
_OWNER_LISTING = (
    sa.select(
        owners.c.token_sha256,
        owners.c.is_active,
        smtp_users.c.name,
        smtp_users.c.password_ciphertext,
        smtp_users.c.password_key_id,
        smtp_users.c.status,
        smtp_users.c.total_limit,
        smtp_users.c.hourly_limit,
        smtp_users.c.sent_total,
        # A user whose newest message is over an hour old sent nothing in the last hour: no lookup
        # in messages (sent_total and last_accepted_at change together, in queue_message).
        sa.case(
            (
                sa.or_(
                    smtp_users.c.last_accepted_at.is_(None),
                    smtp_users.c.last_accepted_at <= sa.bindparam("hour_ago"),
                ),
                0,
            ),
            else_=smtp_users.c.sent_total - sa.func.coalesce(_TOTAL_AN_HOUR_AGO, 0),
        ).label("sent_last_hour"),
    )
    .select_from(
        owners.outerjoin(
            smtp_users, sa.and_(smtp_users.c.owner_pk == owners.c.id, smtp_users.c.deleted_at.is_(None))
        )
    )
    .where(owners.c.owner_id == sa.bindparam("owner_id"))
    .order_by(smtp_users.c.id)
)


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: list[str]  # the parameters in the order the driver takes them
    defaults: dict[str, Any]  # values the statement binds itself (LIMIT 1, ...)
    processors: dict[str, Callable[[Any], Any]]


class _DriverStatement:
    """A Core statement compiled once per dialect and run on the driver's own cursor.

    For the hottest read only: SQLAlchemy's ``Connection.execute`` (cache key, execution context,
    result wrapping) cost more than the query itself. It runs in the caller's transaction; errors
    are the driver's, which carry no parameters (nothing secret reaches a log).
    """

    def __init__(self, statement: sa.Select[Any], *, datetimes: tuple[str, ...] = ()) -> None:
        self._statement = statement
        self._datetimes = datetimes
        self._compiled: dict[tuple[str, str], _Compiled] = {}

    def _compile(self, dialect: sa.Dialect) -> _Compiled:
        compiled = self._statement.compile(dialect=dialect)
        assert compiled.positiontup is not None  # both drivers are positional (qmark, $n)
        processors: dict[str, Callable[[Any], Any]] = {}
        for name in self._datetimes:
            # dialect_impl: the type as this dialect stores it (SQLite: the text SQLAlchemy writes).
            processors[name] = UtcDateTime().dialect_impl(dialect).bind_processor(dialect) or (
                lambda value: value
            )
        entry = _Compiled(
            sql=str(compiled),
            names=list(compiled.positiontup),
            defaults=dict(compiled.params),
            processors=processors,
        )
        self._compiled[(dialect.name, dialect.driver)] = entry
        return entry

    def cursor(self, conn: Connection, params: dict[str, Any]) -> Any:
        """The executed driver cursor, its rows not fetched yet."""
        dialect = conn.dialect
        compiled = self._compiled.get((dialect.name, dialect.driver)) or self._compile(dialect)
        values = {**compiled.defaults, **params}
        for name, process in compiled.processors.items():
            values[name] = process(values[name])
        cursor = conn.connection.cursor()
        cursor.execute(compiled.sql, tuple(values[name] for name in compiled.names))
        return cursor


_OWNER_LISTING_STATEMENT = _DriverStatement(_OWNER_LISTING, datetimes=("hour_ago",))


class ListingTooLongError(Exception):
    """The owner has more SMTP users than the caller would read in this call (``at_most``)."""


def list_owner_smtp_users(
    conn: Connection, *, owner_id: str, token: str, keyring: Keyring, at_most: int | None = None
) -> list[SmtpUserListing] | None:
    """This owner's live SMTP users, oldest first, with their passwords and usage; ``None`` unless
    ``token`` is this active owner's token (an unknown owner costs the same as a wrong token).
    Raises ListingTooLongError, having read no more than that, if there are more than ``at_most``."""
    cursor = _OWNER_LISTING_STATEMENT.cursor(
        conn, {"owner_id": owner_id, "hour_ago": datetime.now(UTC) - HOURLY_WINDOW}
    )
    try:
        first = cursor.fetchone()  # the owner's columns are the same on every row
        if first is None:
            owner_token_matches(token, DUMMY_TOKEN_HASH)
            return None
        if not owner_token_matches(token, bytes(first[0])) or not first[1]:
            return None
        if first[2] is None:  # the owner, and no user (the outer join's one row)
            rows = []
        elif at_most is None:
            rows = [first, *cursor.fetchall()]
        else:
            rows = [first, *cursor.fetchmany(at_most)]  # each row costs its usage lookups: bounded
            if len(rows) > at_most:
                raise ListingTooLongError(at_most)
    finally:
        cursor.close()
    memo = _LISTED
    return [memo.get(row[2:]) or _decrypted(keyring, row[2:]) for row in rows]


# Users listSmtp listed, decrypted, by the columns they were read from (name, ciphertext, key id,
# status, limits, usage): a reset or a key rotation writes a new ciphertext and a message changes the
# usage, so an entry is never stale, and the name in the key keeps each ciphertext bound to its row
# (a copy on another row is decrypted, and refused, afresh). Measured: decryption was ~13 µs of
# listSmtp for 10 users, and building the listing anew another ~5 µs. The key that decrypts them is in
# this process anyway; bounded all the same (~600 bytes an entry).
_LISTED: dict[tuple[Any, ...], SmtpUserListing] = {}
_LISTED_SIZE = 20_000


def _decrypted(keyring: Keyring, columns: tuple[Any, ...]) -> SmtpUserListing:
    name, blob, key_id, status, total, hourly, sent, last_hour = columns
    password = keyring.decrypt_password(key_id, bytes(blob), smtp_user_name=name)
    user = SmtpUserListing(name, password, status, total, hourly, sent, last_hour)
    if len(_LISTED) >= _LISTED_SIZE:
        _LISTED.clear()
    _LISTED[columns] = user
    return user


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
