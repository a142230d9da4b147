"""listSmtp's one-statement listing (store/smtp_users.list_owner_smtp_users): the owner check, the
usage it reports, and passwords still bound to their row when they come from its memo."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.keyring import DecryptionError, Keyring
from poweremail.store import messages, owners, smtp_users
from poweremail.store.schema import smtp_users as smtp_users_table
from poweremail.store.smtp_users import SmtpUserListing
from tests.store.test_time import _migrate
from tests.support import new_owner_with_user, run, store_write


def _send(conn: Connection, user_id: int, recipients: int, at: datetime) -> None:
    addresses = [f"r{i}@example.com" for i in range(recipients)]
    outcome = messages.queue_message(
        conn, smtp_user_id=user_id, credential_version=1, queue_id=f"Q{user_id}x{at.timestamp()}",
        mail_from="a@example.com", rcpt_tos=addresses, data=b"x", now=at,
    )  # fmt: skip
    assert isinstance(outcome, messages.Queued)


def test_listing_reports_usage_and_checks_the_owner(database_url: str, tmp_path: Path) -> None:
    run(_migrate(database_url))
    keyring = Keyring.load_or_create(tmp_path / "secret.key")
    now = datetime.now(UTC)

    def scenario(conn: Connection) -> tuple[object, ...]:
        owner = owners.create_owner(conn)
        empty_owner = owners.create_owner(conn)
        owner_pk = owners.authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
        assert owner_pk is not None
        created = [
            smtp_users.create_smtp_user(
                conn, owner_pk=owner_pk, keyring=keyring, total_limit=100, hourly_limit=50
            )
            for _ in range(3)
        ]
        ids = [smtp_users.find_smtp_user_id(conn, owner_pk=owner_pk, name=name) for name, _ in created]
        assert None not in ids
        busy, idle, _never = (int(i) for i in ids if i is not None)
        for ago, count in ((120, 3), (61, 1), (50, 2), (10, 1)):
            _send(conn, busy, count, now - timedelta(minutes=ago))
        _send(conn, idle, 4, now - timedelta(minutes=90))  # all of it over an hour ago
        listing = smtp_users.list_owner_smtp_users(
            conn, owner_id=owner.owner_id, token=owner.token, keyring=keyring
        )
        wrong = smtp_users.list_owner_smtp_users(conn, owner_id=owner.owner_id, token="nope", keyring=keyring)
        unknown = smtp_users.list_owner_smtp_users(
            conn, owner_id="nobody", token=owner.token, keyring=keyring
        )
        empty = smtp_users.list_owner_smtp_users(
            conn, owner_id=empty_owner.owner_id, token=empty_owner.token, keyring=keyring
        )
        return created, listing, wrong, unknown, empty

    created, listing, wrong, unknown, empty = store_write(database_url, scenario)
    assert wrong is None and unknown is None
    assert empty == []
    assert isinstance(listing, list) and isinstance(created, list)
    assert [(user.name, user.password) for user in listing] == created  # oldest first
    assert [(user.sent_total, user.sent_last_hour) for user in listing] == [(7, 3), (4, 0), (0, 0)]


def test_a_memoized_password_does_not_follow_its_ciphertext_to_another_row(
    database_url: str, tmp_path: Path
) -> None:
    run(_migrate(database_url))
    keyring = Keyring.load_or_create(tmp_path / "secret.key")

    def scenario(conn: Connection) -> None:
        owner = owners.create_owner(conn)
        owner_pk = owners.authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
        assert owner_pk is not None
        (first, _), (second, _) = (
            smtp_users.create_smtp_user(
                conn, owner_pk=owner_pk, keyring=keyring, total_limit=5, hourly_limit=5
            )
            for _ in range(2)
        )
        # Both passwords are now in the memo.
        assert smtp_users.list_owner_smtp_users(
            conn, owner_id=owner.owner_id, token=owner.token, keyring=keyring
        )
        stolen = conn.scalar(
            sa.select(smtp_users_table.c.password_ciphertext).where(smtp_users_table.c.name == first)
        )
        conn.execute(
            smtp_users_table.update()
            .where(smtp_users_table.c.name == second)
            .values(password_ciphertext=stolen)
        )
        with pytest.raises(DecryptionError):
            smtp_users.list_owner_smtp_users(
                conn, owner_id=owner.owner_id, token=owner.token, keyring=keyring
            )

    store_write(database_url, scenario)


def test_the_hour_is_bound_as_sqlalchemy_writes_times_in_sqlite() -> None:
    """Text compared with the stored text: the same format, not sqlite3's own datetime adapter's."""
    from sqlalchemy.dialects import sqlite

    compiled = smtp_users._OWNER_LISTING_STATEMENT._compile(sqlite.dialect())
    moment = datetime(2026, 11, 24, 3, 4, 5, 6, tzinfo=UTC)
    assert compiled.processors["hour_ago"](moment) == "2026-11-24 03:04:05.000006"


def test_a_listing_read_at_most_n_users_refuses_a_longer_one(database_url: str, tmp_path: Path) -> None:
    """``at_most``: what listSmtp reads on the event loop. The owner is checked first, so only its
    own token learns that it has more users; exactly ``at_most`` users is still a listing."""
    run(_migrate(database_url))
    keyring = Keyring.load_or_create(tmp_path / "secret.key")

    def scenario(conn: Connection) -> tuple[object, ...]:
        owner = owners.create_owner(conn)
        owner_pk = owners.authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
        assert owner_pk is not None
        for _ in range(3):
            smtp_users.create_smtp_user(
                conn, owner_pk=owner_pk, keyring=keyring, total_limit=5, hourly_limit=5
            )

        def listing(token: str, at_most: int) -> object:
            return smtp_users.list_owner_smtp_users(
                conn, owner_id=owner.owner_id, token=token, keyring=keyring, at_most=at_most
            )

        exactly = listing(owner.token, 3)
        wrong_token = listing("nope", 2)
        with pytest.raises(smtp_users.ListingTooLongError):
            listing(owner.token, 2)
        return exactly, wrong_token

    exactly, wrong_token = store_write(database_url, scenario)
    assert isinstance(exactly, list) and len(exactly) == 3
    assert wrong_token is None


def test_a_remembered_listing_follows_every_change(database_url: str, tmp_path: Path) -> None:
    """The users listed are remembered by the columns they came from: a message sent, a reset or an
    edit makes new columns, so a listing never answers from before the change."""
    run(_migrate(database_url))
    keyring = Keyring.load_or_create(tmp_path / "secret.key")
    now = datetime.now(UTC)

    def scenario(conn: Connection) -> tuple[list[SmtpUserListing], str]:
        owner, user_id, name = new_owner_with_user(conn, keyring, total_limit=50, hourly_limit=20)

        def listed() -> SmtpUserListing:
            listing = smtp_users.list_owner_smtp_users(
                conn, owner_id=owner.owner_id, token=owner.token, keyring=keyring
            )
            assert listing is not None and len(listing) == 1
            return listing[0]

        seen = [listed(), listed()]
        _send(conn, user_id, 2, now - timedelta(minutes=5))
        seen.append(listed())
        password = smtp_users.reset_smtp_password(conn, smtp_user_id=user_id, name=name, keyring=keyring)
        seen.append(listed())
        smtp_users.update_smtp_user(conn, smtp_user_id=user_id, total_limit=40, status="Disable")
        seen.append(listed())
        return seen, password

    (first, again, after_send, after_reset, after_edit), password = store_write(database_url, scenario)
    assert again == first
    assert (first.sent_total, first.sent_last_hour) == (0, 0)
    assert (after_send.sent_total, after_send.sent_last_hour) == (2, 2)
    assert after_reset.password == password != first.password
    assert (after_edit.status, after_edit.total_limit, after_edit.hourly_limit) == ("Disable", 40, 20)
