"""Accepted mail: the one transaction that checks the limits, counts the recipients and queues the
message (SPEC §3: "a message is either queued and counted, or neither"), and the usage queries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.domain.limits import HOURLY_WINDOW, Limits, OverLimit, Usage, check_limits
from poweremail.store.schema import message_contents, messages, owners, recipients, smtp_users


@dataclass(frozen=True)
class SenderState:
    """An SMTP user as the submission server needs it at MAIL and at the end of DATA."""

    may_send: bool  # enabled, not deleted, owner active
    credential_version: int
    limits: Limits
    usage: Usage


@dataclass(frozen=True)
class Queued:
    queue_id: str


@dataclass(frozen=True)
class CredentialsRevoked:
    """Disabled, deleted or reset since the session logged in."""


QueueOutcome = Queued | OverLimit | CredentialsRevoked


def hourly_usage(conn: Connection, *, smtp_user_id: int, now: datetime) -> tuple[tuple[datetime, int], ...]:
    rows = conn.execute(
        sa.select(messages.c.accepted_at, messages.c.recipient_count)
        .where(messages.c.smtp_user_id == smtp_user_id, messages.c.accepted_at > now - HOURLY_WINDOW)
        .order_by(messages.c.accepted_at)
    )
    return tuple((accepted_at, count) for accepted_at, count in rows)


def sender_state(
    conn: Connection, *, smtp_user_id: int, now: datetime, lock: bool = False
) -> SenderState | None:
    """The user's status, limits and usage; ``lock`` holds its row until the transaction ends.

    The row lock is what makes the limits exact across sessions and nodes on PostgreSQL
    (``SELECT … FOR UPDATE``); on SQLite the write transaction itself (``BEGIN IMMEDIATE``) already
    excludes every other writer.
    """
    query = (
        sa.select(
            smtp_users.c.status,
            smtp_users.c.deleted_at,
            smtp_users.c.credential_version,
            smtp_users.c.total_limit,
            smtp_users.c.hourly_limit,
            smtp_users.c.sent_total,
            owners.c.is_active,
        )
        .join(owners, owners.c.id == smtp_users.c.owner_pk)
        .where(smtp_users.c.id == smtp_user_id)
    )
    if lock:
        query = query.with_for_update(of=smtp_users)
    row = (conn.execute(query)).first()
    if row is None:
        return None
    return SenderState(
        may_send=row.status == "Enable" and row.deleted_at is None and bool(row.is_active),
        credential_version=row.credential_version,
        limits=Limits(total_limit=row.total_limit, hourly_limit=row.hourly_limit),
        usage=Usage(
            sent_total=row.sent_total,
            last_hour=hourly_usage(conn, smtp_user_id=smtp_user_id, now=now),
        ),
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
        return refusal
    message_id = (
        conn.execute(
            messages.insert()
            .values(
                queue_id=queue_id,
                smtp_user_id=smtp_user_id,
                mail_from=mail_from,
                recipient_count=len(rcpt_tos),
                size_bytes=len(data),
                accepted_at=now,
            )
            .returning(messages.c.id)
        )
    ).scalar_one()
    conn.execute(message_contents.insert().values(message_id=message_id, data=data))
    conn.execute(recipients.insert(), [{"message_id": message_id, "address": rcpt} for rcpt in rcpt_tos])
    conn.execute(
        smtp_users.update()
        .where(smtp_users.c.id == smtp_user_id)
        .values(sent_total=smtp_users.c.sent_total + len(rcpt_tos))
    )
    return Queued(queue_id)
