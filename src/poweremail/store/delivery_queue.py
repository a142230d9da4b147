"""The delivery queue: claiming due recipients under a lease, and recording each attempt's outcome.

A recipient is due when its state is ``queued`` or ``deferred``, its ``next_attempt_at`` has come and
nobody holds a live lease on it. Claiming sets ``locked_by``/``locked_until`` in the same statement
that picks the rows: on PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets workers on many nodes claim at
once without waiting for each other or taking the same row; on SQLite the write transaction
(``BEGIN IMMEDIATE``) already excludes every other writer. A worker that dies keeps its claim only
until ``locked_until`` (SPEC §5: "its claim expires within about a minute").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.domain.addresses import address_domain
from poweremail.store import message_parts
from poweremail.store.driver_statements import DriverStatement
from poweremail.store.schema import message_contents, messages, recipients

logger = logging.getLogger("poweremail.store")

FinalState = Literal["deferred", "delivered", "bounced"]

# Spelled exactly as the partial index ix_recipients_due: SQLite uses a partial index only when the
# query repeats its condition literally (bound parameters in its place would not match).
_PENDING = sa.text("recipients.state IN ('queued', 'deferred')")
_REPLY_MAX = 1000  # the width of recipients.last_reply


@dataclass(frozen=True)
class ClaimedRecipient:
    id: int
    message_id: int
    address: str
    domain: str
    attempts: int  # attempts made before this one


@dataclass(frozen=True)
class QueuedMessage:
    id: int
    queue_id: str
    mail_from: str  # "" for the null sender
    accepted_at: datetime
    is_bounce: bool
    data: bytes


@dataclass(frozen=True)
class RecipientOutcome:
    """What one attempt came to, as the worker decided it (``poweremail.delivery.worker``)."""

    recipient_id: int
    state: FinalState
    next_attempt_at: datetime | None  # for "deferred"
    reply: str
    remote_mta: str | None


@dataclass(frozen=True)
class PlannedBounce:
    """The report to queue for the recipients of ``message_id`` that this record makes bounced.

    ``build`` gets the ids that really did bounce (a recipient whose lease another worker took in
    the meantime is not recorded, so not reported) and returns the report's bytes.
    """

    message_id: int
    mail_to: str
    build: Callable[[Collection[int]], tuple[str, bytes] | None]  # → (queue id, bytes), None: no report


_DUE = (
    sa.select(recipients.c.id)
    .where(
        _PENDING,
        recipients.c.next_attempt_at <= sa.bindparam("now"),
        sa.or_(recipients.c.locked_until.is_(None), recipients.c.locked_until < sa.bindparam("now")),
    )
    .order_by(recipients.c.next_attempt_at)
    .limit(sa.bindparam("limit"))
    # Ignored by SQLite, where the write transaction already excludes every other writer.
    .with_for_update(skip_locked=True)
)
_CLAIM = (
    recipients.update()
    .where(recipients.c.id.in_(_DUE.scalar_subquery()))
    .values(locked_by=sa.bindparam("worker"), locked_until=sa.bindparam("until"))
    .returning(
        recipients.c.id,
        recipients.c.message_id,
        recipients.c.address,
        recipients.c.domain,
        recipients.c.attempts,
    )
)
_MESSAGES = (
    sa.select(
        messages.c.id,
        messages.c.queue_id,
        messages.c.mail_from,
        messages.c.accepted_at,
        messages.c.bounce_of,
        message_contents.c.data,
        message_contents.c.parts,
    )
    .join(message_contents, message_contents.c.message_id == messages.c.id)
    .where(messages.c.id.in_(sa.bindparam("ids", expanding=True)))
)
_RECORD = DriverStatement(
    recipients.update()
    .where(recipients.c.id == sa.bindparam("recipient_id"), recipients.c.locked_by == sa.bindparam("worker"))
    .values(
        state=sa.bindparam("new_state"),
        attempts=recipients.c.attempts + 1,
        next_attempt_at=sa.bindparam("next_at"),
        last_attempt_at=sa.bindparam("now"),
        last_reply=sa.bindparam("reply"),
        remote_mta=sa.bindparam("mta"),
        locked_by=None,
        locked_until=None,
    )
)
# The recipients a batch of records may still record (SELECT first, then one executemany: an
# executemany tells only how many rows it changed, not which), locked in id order on PostgreSQL
# (see lock_recipients).
_STILL_LEASED = (
    sa.select(recipients.c.id)
    .where(
        recipients.c.id.in_(sa.bindparam("ids", expanding=True)),
        recipients.c.locked_by == sa.bindparam("worker"),
    )
    .order_by(recipients.c.id)
    .with_for_update()
)
_EXTEND = (
    recipients.update()
    .where(
        recipients.c.id.in_(sa.bindparam("ids", expanding=True)),
        recipients.c.locked_by == sa.bindparam("worker"),
    )
    .values(locked_until=sa.bindparam("until"))
)
_LOCK_IN_ORDER = (
    sa.select(recipients.c.id)
    .where(recipients.c.id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(recipients.c.id)
    .with_for_update()
)
_RELEASE_ALL = (
    recipients.update()
    .where(recipients.c.locked_by == sa.bindparam("worker"))
    .values(locked_by=None, locked_until=None)
)
_RELEASE = _RELEASE_ALL.where(recipients.c.id.in_(sa.bindparam("ids", expanding=True)))
_RELEASE_ALL_BUT = _RELEASE_ALL.where(recipients.c.id.not_in(sa.bindparam("keep", expanding=True)))
_INSERT_MESSAGE = messages.insert().returning(messages.c.id)
_INSERT_CONTENT = message_contents.insert()
_INSERT_RECIPIENT = recipients.insert()


def claim_due(
    conn: Connection, *, worker: str, now: datetime, until: datetime, limit: int
) -> list[ClaimedRecipient]:
    """Take up to ``limit`` due recipients, oldest due first, leased to ``worker`` until ``until``."""
    rows = conn.execute(_CLAIM, {"worker": worker, "until": until, "now": now, "limit": limit}).all()
    claimed = [
        ClaimedRecipient(row.id, row.message_id, row.address, row.domain, row.attempts) for row in rows
    ]
    # RETURNING gives no order; deliver a message's recipients in the order they were given.
    return sorted(claimed, key=lambda recipient: recipient.id)


def load_messages(conn: Connection, message_ids: Collection[int]) -> dict[int, QueuedMessage]:
    rows = conn.execute(_MESSAGES, {"ids": list(message_ids)}).all()
    written_ahead = {row.queue_id: row.parts for row in rows if row.parts is not None}
    parts = message_parts.read_parts(conn, written_ahead) if written_ahead else {}
    loaded: dict[int, QueuedMessage] = {}
    for row in rows:
        data = row.data
        if row.parts is not None:
            found = parts.get(row.queue_id, [])
            if len(found) != row.parts:
                # Only if someone deleted rows by hand: the message cannot be sent whole, and is
                # left out (its delivery fails as for a message not in the store), not cut short.
                logger.error("message %s: %d parts queued, %d stored", row.queue_id, row.parts, len(found))
                continue
            data = b"".join(found)
        loaded[row.id] = QueuedMessage(
            id=row.id,
            queue_id=row.queue_id,
            mail_from=row.mail_from,
            accepted_at=row.accepted_at,
            is_bounce=row.bounce_of is not None,
            data=data,
        )
    return loaded


@dataclass(frozen=True)
class AttemptRecord:
    """What one delivery transaction left to record: each recipient's outcome, a bounce to queue."""

    now: datetime
    outcomes: Sequence[RecipientOutcome]
    bounce: PlannedBounce | None = None


def record_attempts(conn: Connection, *, worker: str, records: Sequence[AttemptRecord]) -> int:
    """Record one attempt per recipient and release its lease; queue each record's bounce for those
    of its recipients that bounced, in the same transaction (a recipient is bounced and reported, or
    neither).

    Only recipients still leased to ``worker`` are recorded: if the lease expired and another worker
    took the recipient, that worker's record is the one that counts. Returns how many were recorded.
    """
    ids = [outcome.recipient_id for record in records for outcome in record.outcomes]
    if not ids:
        return 0
    still_ours = set(conn.execute(_STILL_LEASED, {"ids": ids, "worker": worker}).scalars())
    # One executemany for every recipient rather than a statement each, on SQLite by the driver:
    # it holds SQLite's write lock, which acceptance waits for, a shorter time.
    updates = [
        {
            "recipient_id": outcome.recipient_id,
            "worker": worker,
            "new_state": outcome.state,
            "next_at": outcome.next_attempt_at or record.now,
            "now": record.now,
            "reply": outcome.reply[:_REPLY_MAX],
            "mta": outcome.remote_mta[:255] if outcome.remote_mta else None,
        }
        for record in records
        for outcome in record.outcomes
        if outcome.recipient_id in still_ours
    ]
    _RECORD.executemany(conn, updates)
    for record in records:
        bounced = [
            outcome.recipient_id
            for outcome in record.outcomes
            if outcome.state == "bounced" and outcome.recipient_id in still_ours
        ]
        if record.bounce is None or not bounced:
            continue
        report = record.bounce.build(bounced)
        if report is not None:
            queue_id, data = report
            queue_bounce(
                conn,
                bounce_of=record.bounce.message_id,
                queue_id=queue_id,
                mail_to=record.bounce.mail_to,
                data=data,
                now=record.now,
            )
    return len(updates)


def queue_bounce(
    conn: Connection, *, bounce_of: int, queue_id: str, mail_to: str, data: bytes, now: datetime
) -> None:
    """A report from the null sender, queued like any message but under no SMTP user's limits."""
    message_id = conn.execute(
        _INSERT_MESSAGE,
        {
            "queue_id": queue_id,
            "smtp_user_id": None,
            "mail_from": "",
            "recipient_count": 1,
            "size_bytes": len(data),
            "accepted_at": now,
            "sent_total_after": 0,
            "bounce_of": bounce_of,
        },
    ).scalar_one()
    conn.execute(_INSERT_CONTENT, {"message_id": message_id, "data": data})
    conn.execute(
        _INSERT_RECIPIENT,
        {
            "message_id": message_id,
            "address": mail_to,
            "domain": address_domain(mail_to),
            "next_attempt_at": now,
        },
    )


def lock_recipients(conn: Connection, recipient_ids: Collection[int]) -> None:
    """Lock these recipients' rows in id order (PostgreSQL; SQLite has one writer at a time).

    Every transaction that changes many of one worker's rows at once (renewing its leases here,
    recording a batch of outcomes with _STILL_LEASED) locks them first in this order: two of them
    then never wait for each other in a cycle. Seen before: a lease renewal (rows in the order of the
    index scan) against a batch of outcomes (rows in the order deliveries ended), and PostgreSQL
    aborting one as a deadlock.
    """
    if recipient_ids and conn.dialect.name == "postgresql":
        conn.execute(_LOCK_IN_ORDER, {"ids": sorted(recipient_ids)})


def extend_leases(conn: Connection, *, worker: str, recipient_ids: Collection[int], until: datetime) -> None:
    if recipient_ids:
        lock_recipients(conn, recipient_ids)
        conn.execute(_EXTEND, {"ids": list(recipient_ids), "worker": worker, "until": until})


def release_leases(
    conn: Connection,
    *,
    worker: str,
    recipient_ids: Collection[int] | None = None,
    keep: Collection[int] = (),
) -> int:
    """Give back claims not attempted (a stopping worker), or all of ``worker``'s (one starting
    again: SPEC §5, "a restarted node resumes its own at once") but those in ``keep``."""
    if recipient_ids is None:
        if keep:
            return conn.execute(_RELEASE_ALL_BUT, {"worker": worker, "keep": list(keep)}).rowcount
        return conn.execute(_RELEASE_ALL, {"worker": worker}).rowcount
    if not recipient_ids:
        return 0
    return conn.execute(_RELEASE, {"worker": worker, "ids": list(recipient_ids)}).rowcount
