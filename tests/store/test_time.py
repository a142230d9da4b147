"""Timestamps come back timezone-aware in UTC from both stores, whatever the local time zone."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection

from poweremail.domain.limits import Usage
from poweremail.store import messages, owners
from poweremail.store.database import Database
from poweremail.store.schema import smtp_users
from tests.support import run, store_read, store_write


async def _migrate(url: str) -> None:
    database = Database(url)
    try:
        await database.migrate()
    finally:
        await database.close()


def _round_trip(url: str) -> tuple[datetime, datetime]:
    sent_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)

    def send(conn: Connection) -> int:
        owner = owners.create_owner(conn)
        owner_pk = owners.authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
        user_id: int = conn.execute(
            smtp_users.insert()
            .values(name="smtp1", owner_pk=owner_pk, status="Enable", total_limit=9, hourly_limit=9,
                    created_at=sent_at, updated_at=sent_at)
            .returning(smtp_users.c.id)
        ).scalar_one()  # fmt: skip
        outcome = messages.queue_message(
            conn, smtp_user_id=user_id, credential_version=1, queue_id="Q1", mail_from="a@example.com",
            rcpt_tos=["b@example.com"], data=b"x", now=sent_at,
        )  # fmt: skip
        assert outcome == messages.Queued("Q1")
        return user_id

    run(_migrate(url))
    user_id = store_write(url, send)
    resume_at = store_read(
        url,
        lambda conn: messages.hourly_resume_at(
            conn, smtp_user_id=user_id, usage=Usage(1, 1), excess=1, now=datetime.now(UTC)
        ),
    )
    return sent_at, resume_at


def test_timestamps_are_utc_aware(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        sent_at, resume_at = _round_trip(database_url)
    finally:
        monkeypatch.undo()
        time.tzset()
    # Sending resumes an hour after the one message left the window: read back as UTC, not local.
    assert resume_at == sent_at + timedelta(hours=1)
    assert resume_at.tzinfo is not None and resume_at.utcoffset() == timedelta(0)
