"""Accepted mail: the one transaction that checks the limits, counts the recipients and queues the
message (SPEC §3: "a message is either queued and counted, or neither"), and the usage queries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.domain.addresses import address_domain
from poweremail.domain.limits import HOURLY_WINDOW, Limits, OverLimit, Usage, check_limits
from poweremail.store.schema import message_contents, messages, owners, recipients, smtp_users


@dataclass(frozen=True)
class SenderState:
    """An SMTP user as the submission server needs it at MAIL and at the end of DATA."""

    may_send: bool  # enabled, not deleted, owner active
    credential_version: int
    limits: Limits
    usage: Usage
    last_accepted_at: datetime | None


@dataclass(frozen=True)
class Queued:
    queue_id: str


@dataclass(frozen=True)
class CredentialsRevoked:
    """Disabled, deleted or reset since the session logged in."""


QueueOutcome = Queued | OverLimit | CredentialsRevoked


# Every statement of the submission path is built once and executed with parameters: building a
# Core statement per call cost 3.6x executing a prebuilt one (205 vs 57 µs, measured on SQLite).
_TOTAL_BEFORE_WINDOW = (
    sa.select(messages.c.sent_total_after)
    .where(
        messages.c.smtp_user_id == sa.bindparam("user_id"), messages.c.accepted_at <= sa.bindparam("hour_ago")
    )
    .order_by(messages.c.accepted_at.desc())
    .limit(1)
)
_FIRST_REACHING = (
    sa.select(messages.c.accepted_at)
    .where(
        messages.c.smtp_user_id == sa.bindparam("user_id"),
        messages.c.sent_total_after >= sa.bindparam("needed"),
    )
    .order_by(messages.c.sent_total_after)
    .limit(1)
)
_SENDER = (
    sa.select(
        smtp_users.c.status,
        smtp_users.c.deleted_at,
        smtp_users.c.credential_version,
        smtp_users.c.total_limit,
        smtp_users.c.hourly_limit,
        smtp_users.c.sent_total,
        smtp_users.c.last_accepted_at,
        owners.c.is_active,
    )
    .join(owners, owners.c.id == smtp_users.c.owner_pk)
    .where(smtp_users.c.id == sa.bindparam("user_id"))
)
_SENDER_LOCKED = _SENDER.with_for_update(of=smtp_users)
_INSERT_MESSAGE = messages.insert().returning(messages.c.id)
_INSERT_CONTENT = message_contents.insert()
_INSERT_RECIPIENT = recipients.insert()
_COUNT_SENT = (
    smtp_users.update()
    .where(smtp_users.c.id == sa.bindparam("user_id"))
    .values(sent_total=sa.bindparam("sent_total"), last_accepted_at=sa.bindparam("accepted_at"))
)


def _sent_last_hour(conn: Connection, *, smtp_user_id: int, sent_total: int, now: datetime) -> int:
    """Recipients sent in the rolling hour: sent_total minus the running total as it stood an hour
    ago (one index lookup on messages(smtp_user_id, accepted_at))."""
    before_window = conn.scalar(
        _TOTAL_BEFORE_WINDOW, {"user_id": smtp_user_id, "hour_ago": now - HOURLY_WINDOW}
    )
    return sent_total - (before_window or 0)


def hourly_resume_at(
    conn: Connection, *, smtp_user_id: int, usage: Usage, excess: int, now: datetime
) -> datetime:
    """When ``excess`` more of the recipients counted in ``usage.sent_last_hour`` will have left the
    rolling hour. Recipients beyond what is stored (an open transaction's) count as sent ``now``."""
    if excess > usage.sent_last_hour:
        return now + HOURLY_WINDOW
    needed = usage.sent_total - usage.sent_last_hour + excess
    accepted_at = conn.scalar(_FIRST_REACHING, {"user_id": smtp_user_id, "needed": needed})
    return (accepted_at or now) + HOURLY_WINDOW


def sender_state(
    conn: Connection, *, smtp_user_id: int, now: datetime, lock: bool = False
) -> SenderState | None:
    """The user's status, limits and usage; ``lock`` holds its row until the transaction ends.

    The row lock is what makes the limits exact across sessions and nodes on PostgreSQL
    (``SELECT … FOR UPDATE``); on SQLite the write transaction itself (``BEGIN IMMEDIATE``) already
    excludes every other writer.
    """
    row = conn.execute(_SENDER_LOCKED if lock else _SENDER, {"user_id": smtp_user_id}).first()
    if row is None:
        return None
    return SenderState(
        may_send=row.status == "Enable" and row.deleted_at is None and bool(row.is_active),
        credential_version=row.credential_version,
        limits=Limits(total_limit=row.total_limit, hourly_limit=row.hourly_limit),
        usage=Usage(
            sent_total=row.sent_total,
            sent_last_hour=_sent_last_hour(
                conn, smtp_user_id=smtp_user_id, sent_total=row.sent_total, now=now
            ),
        ),
        last_accepted_at=row.last_accepted_at,
    )


def queue_message(
    conn: Connection,
    *,
    smtp_user_id: int,
    credential_version: int,
    queue_id: str,
    mail_from: str,
    rcpt_tos: Sequence[str],
    data: bytes,
    now: datetime,
) -> QueueOutcome:
    """In the caller's write transaction: check the limits under the user's row lock, then queue
    the message and count its recipients. Nothing is written unless everything is."""
    state = sender_state(conn, smtp_user_id=smtp_user_id, now=now, lock=True)
    if state is None or not state.may_send or state.credential_version != credential_version:
        return CredentialsRevoked()
    refusal = check_limits(limits=state.limits, usage=state.usage, recipients=len(rcpt_tos))
    if refusal is not None:
        if refusal.which == "hourly" and refusal.excess:
            resume_at = hourly_resume_at(
                conn, smtp_user_id=smtp_user_id, usage=state.usage, excess=refusal.excess, now=now
            )
            return replace(refusal, resume_at=resume_at)
        return refusal
    # Never earlier than the user's previous message, even if another node's clock is behind: the
    # running totals then stay in time order, which the rolling-hour lookups rely on.
    if state.last_accepted_at is not None and state.last_accepted_at > now:
        now = state.last_accepted_at
    sent_total_after = state.usage.sent_total + len(rcpt_tos)
    message_id = conn.execute(
        _INSERT_MESSAGE,
        {
            "queue_id": queue_id,
            "smtp_user_id": smtp_user_id,
            "mail_from": mail_from,
            "recipient_count": len(rcpt_tos),
            "size_bytes": len(data),
            "accepted_at": now,
            "sent_total_after": sent_total_after,
        },
    ).scalar_one()
    conn.execute(_INSERT_CONTENT, {"message_id": message_id, "data": data})
    conn.execute(
        _INSERT_RECIPIENT,
        [
            {
                "message_id": message_id,
                "address": rcpt,
                "domain": address_domain(rcpt),
                "next_attempt_at": now,
            }
            for rcpt in rcpt_tos
        ],
    )
    conn.execute(_COUNT_SENT, {"user_id": smtp_user_id, "sent_total": sent_total_after, "accepted_at": now})
    return Queued(queue_id)
