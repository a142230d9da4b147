"""What listMessages shows (SPEC §5): an SMTP user's recent messages, newest first, and for each
recipient its delivery state, attempts and the last remote reply.

Two statements, both built once (see messages.py): a page of the user's messages, read backwards
along the index on messages(smtp_user_id, accepted_at); then the recipients of that page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.schema import messages, recipients

# States after which nothing more is attempted: a due time means nothing there.
FINAL_STATES = frozenset({"delivered", "bounced"})


@dataclass(frozen=True)
class RecipientListing:
    address: str
    state: str  # queued, deferred, delivered or bounced
    attempts: int
    last_reply: str | None  # the last attempt's outcome; None before the first
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None  # None once delivered or bounced


@dataclass(frozen=True)
class MessageListing:
    queue_id: str
    accepted_at: datetime
    mail_from: str  # "" for the null sender
    size_bytes: int
    recipients: tuple[RecipientListing, ...]  # in the order they were given (RCPT order)


@dataclass(frozen=True)
class MessagePage:
    messages: list[MessageListing]
    has_more: bool  # at least one older message beyond this page


# Bounce reports have smtp_user_id NULL, so they never match: they are PowerEmail's, not the user's.
_PAGE = (
    sa.select(
        messages.c.id,
        messages.c.queue_id,
        messages.c.accepted_at,
        messages.c.mail_from,
        messages.c.size_bytes,
    )
    .where(messages.c.smtp_user_id == sa.bindparam("user_id"))
    .order_by(messages.c.accepted_at.desc(), messages.c.id.desc())
    .limit(sa.bindparam("limit"))
    .offset(sa.bindparam("offset"))
)
_RECIPIENTS = (
    sa.select(
        recipients.c.message_id,
        recipients.c.address,
        recipients.c.state,
        recipients.c.attempts,
        recipients.c.last_reply,
        recipients.c.last_attempt_at,
        recipients.c.next_attempt_at,
    )
    .where(recipients.c.message_id.in_(sa.bindparam("message_ids", expanding=True)))
    .order_by(recipients.c.id)
)


def list_messages(conn: Connection, *, smtp_user_id: int, limit: int, offset: int) -> MessagePage:
    """Up to ``limit`` of the user's messages, newest first (ties by id), after skipping ``offset``."""
    rows = conn.execute(_PAGE, {"user_id": smtp_user_id, "limit": limit + 1, "offset": offset}).all()
    has_more = len(rows) > limit
    rows = rows[:limit]
    by_message: dict[int, list[RecipientListing]] = {row.id: [] for row in rows}
    if by_message:
        for rcpt in conn.execute(_RECIPIENTS, {"message_ids": list(by_message)}):
            by_message[rcpt.message_id].append(
                RecipientListing(
                    address=rcpt.address,
                    state=rcpt.state,
                    attempts=rcpt.attempts,
                    last_reply=rcpt.last_reply,
                    last_attempt_at=rcpt.last_attempt_at,
                    next_attempt_at=None if rcpt.state in FINAL_STATES else rcpt.next_attempt_at,
                )
            )
    return MessagePage(
        messages=[
            MessageListing(
                queue_id=row.queue_id,
                accepted_at=row.accepted_at,
                mail_from=row.mail_from,
                size_bytes=row.size_bytes,
                recipients=tuple(by_message[row.id]),
            )
            for row in rows
        ],
        has_more=has_more,
    )
