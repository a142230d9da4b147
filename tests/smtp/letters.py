"""Letters submitted over SMTP, what the server answered for each, and what the store holds.

For tests that send many messages at once (limit races, crashes): the client is the standard
library's ``smtplib``, blocking, so concurrency comes from threads.
"""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.schema import messages, recipients, smtp_users
from tests.smtp.helpers import SmtpUser
from tests.support import store_read, stored_bodies

QUEUED_PREFIX = "250 2.0.0 Ok: queued as "


# --- submitting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    """One message to submit; ``marker`` is unique and appears in its subject and body."""

    recipients: tuple[str, ...]
    marker: str
    filler: int = 0  # lines of 78 octets after the body's first line

    @classmethod
    def to(cls, count: int, *, filler: int = 0) -> Letter:
        marker = uuid.uuid4().hex
        return cls(tuple(f"rcpt{i}.{marker[:12]}@example.com" for i in range(count)), marker, filler)

    def body(self) -> bytes:
        return f"Body of {self.marker}\r\n".encode() + b"".join(
            b"%076d\r\n" % line for line in range(self.filler)
        )

    def content(self) -> bytes:
        head = f"From: sender@example.com\r\nTo: {', '.join(self.recipients)}\r\nSubject: {self.marker}\r\n"
        return head.encode() + b"\r\n" + self.body()


@dataclass(frozen=True)
class Outcome:
    """What the server finally answered for one letter: the DATA reply, or the refusing RCPT reply."""

    letter: Letter
    stage: Literal["RCPT", "DATA"]
    reply: str

    @property
    def queue_id(self) -> str | None:
        if self.stage == "DATA" and self.reply.startswith(QUEUED_PREFIX):
            return self.reply.removeprefix(QUEUED_PREFIX)
        return None


def _reply(code: int, message: bytes | str) -> str:
    text = message.decode(errors="replace") if isinstance(message, bytes) else message
    return f"{code} {text}"


def connect(port: int, user: SmtpUser) -> smtplib.SMTP:
    """A logged-in session over plain SMTP (loopback clients may AUTH without TLS)."""
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=60)
    try:
        client.ehlo()
        client.login(user.name, user.password)
    except BaseException:
        client.close()
        raise
    return client


def transact(
    client: smtplib.SMTP, letter: Letter, *, before_data: Callable[[], object] | None = None
) -> Outcome:
    """MAIL, RCPT for every recipient, then ``before_data()`` (always called), then DATA unless a
    recipient was refused; a refused recipient ends the transaction with RSET."""
    code, message = client.mail("sender@example.com")
    assert code == 250, _reply(code, message)
    refusal: str | None = None
    for address in letter.recipients:
        code, message = client.rcpt(address)
        if code != 250:
            refusal = _reply(code, message)
            break
    if before_data is not None:
        before_data()
    if refusal is not None:
        client.rset()
        return Outcome(letter, "RCPT", refusal)
    try:
        code, message = client.data(letter.content())
    except smtplib.SMTPDataError as error:
        return Outcome(letter, "DATA", _reply(error.smtp_code, error.smtp_error))
    return Outcome(letter, "DATA", _reply(code, message))


def submit(
    port: int, user: SmtpUser, letter: Letter, *, before_data: Callable[[], object] | None = None
) -> Outcome:
    """One session, one transaction."""
    with connect(port, user) as client:
        return transact(client, letter, before_data=before_data)


# --- what the store holds -------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuedMessage:
    queue_id: str
    recipient_count: int
    recipients: tuple[str, ...]  # in insertion order
    data: bytes | None  # None: no message_contents row
    accepted_at: datetime


def _queued_messages(conn: Connection, smtp_user_name: str) -> dict[str, QueuedMessage]:
    rows = conn.execute(
        sa.select(
            messages.c.id,
            messages.c.queue_id,
            messages.c.recipient_count,
            messages.c.accepted_at,
        )
        .select_from(messages.join(smtp_users, smtp_users.c.id == messages.c.smtp_user_id))
        .where(smtp_users.c.name == smtp_user_name)
    ).all()
    bodies = stored_bodies(conn, [row.id for row in rows])
    addresses: dict[int, list[str]] = {row.id: [] for row in rows}
    if addresses:
        for message_id, address in conn.execute(
            sa.select(recipients.c.message_id, recipients.c.address)
            .where(recipients.c.message_id.in_(addresses))
            .order_by(recipients.c.id)
        ):
            addresses[message_id].append(address)
    return {
        row.queue_id: QueuedMessage(
            row.queue_id, row.recipient_count, tuple(addresses[row.id]), bodies.get(row.id), row.accepted_at
        )
        for row in rows
    }


def queued_messages(database_url: str, user: SmtpUser) -> dict[str, QueuedMessage]:
    """Every message of ``user`` in the database, by queue id, read directly from the tables."""
    return store_read(database_url, lambda conn: _queued_messages(conn, user.name))


def assert_queued_as_acknowledged(stored: dict[str, QueuedMessage], acknowledged: Sequence[Outcome]) -> None:
    """Each 250-acknowledged letter is queued under its queue id: recipients, count and content."""
    for outcome in acknowledged:
        assert outcome.queue_id is not None, outcome
        message = stored.get(outcome.queue_id)
        assert message is not None, f"{outcome.queue_id} got 250 but is not in the messages table"
        assert message.recipient_count == len(outcome.letter.recipients), message
        assert message.recipients == outcome.letter.recipients, message
        assert message.data is not None, f"{outcome.queue_id} has no message_contents row"
        assert f"Subject: {outcome.letter.marker}\r\n".encode() in message.data
        assert f"Body of {outcome.letter.marker}\r\n".encode() in message.data
        assert f" id {outcome.queue_id}".encode() in message.data  # our Received header


def assert_whole(stored: dict[str, QueuedMessage]) -> None:
    """No half-queued message: every row has its content and exactly its counted recipients."""
    for message in stored.values():
        assert message.data is not None, message
        assert len(message.recipients) == message.recipient_count, message


def resume_at_text(accepted_at: datetime) -> str:
    """How the hourly refusal names the moment a message leaves the rolling hour (UTC, seconds)."""
    if accepted_at.tzinfo is None:  # SQLite gives back the UTC time it was given, without the zone
        accepted_at = accepted_at.replace(tzinfo=UTC)
    moment = (accepted_at + timedelta(hours=1)).astimezone(UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")
