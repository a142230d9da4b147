"""The tables. Names follow the product: an owner has SMTP users; each SMTP user has limits.

Migrations in ``migrations/versions`` create exactly this schema; a test compares the two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A point in time, always read back timezone-aware in UTC.

    SQLite has no time zones: it stores the text and hands back naive datetimes, which Python would
    later take for local time (a wrong "sending resumes at" on any server not running in UTC).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# The document's "PowerEmailUser": who calls the management API with owner_id + token.
owners = sa.Table(
    "owners",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # The public identifier, the API's owner_id.
    sa.Column("owner_id", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=True),
    # SHA-256 of the token; the token itself is shown once, at creation or rotation.
    sa.Column("token_sha256", sa.LargeBinary(32), nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("token_rotated_at", UtcDateTime(), nullable=True),
    sqlite_autoincrement=True,
)

# The credentials applications log in to our SMTP server with, and their sending limits.
smtp_users = sa.Table(
    "smtp_users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # "smtp" + digits, unique across all owners and never reused: a deleted user keeps its row.
    sa.Column("name", sa.String(32), nullable=False, unique=True),
    sa.Column("owner_pk", sa.Integer, sa.ForeignKey("owners.id"), nullable=False, index=True),
    # AES-GCM nonce + ciphertext of the password, the SMTP user's name as associated data
    # (poweremail.keyring). NULL once the user is deleted: nothing left to recover.
    sa.Column("password_ciphertext", sa.LargeBinary, nullable=True),
    sa.Column("password_key_id", sa.Integer, nullable=True),
    sa.Column("status", sa.String(7), nullable=False),
    sa.Column("total_limit", sa.Integer, nullable=False),
    sa.Column("hourly_limit", sa.Integer, nullable=False),
    # Recipients accepted over the user's life (SPEC §3 total_limit), counted in the same transaction
    # that queues the message.
    sa.Column("sent_total", sa.BigInteger, nullable=False, server_default="0"),
    # Bumped by a password reset: an SMTP session that logged in with an older version can start
    # no new transaction (SPEC §4).
    sa.Column("credential_version", sa.Integer, nullable=False, server_default="1"),
    # When its newest message was accepted: the next one is never stamped earlier, so the messages
    # of one user are in the same order by time and by sent_total_after (see messages).
    sa.Column("last_accepted_at", UtcDateTime(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Column("deleted_at", UtcDateTime(), nullable=True),
    sa.CheckConstraint("status IN ('Enable', 'Disable')", name="status_is_enable_or_disable"),
    sa.CheckConstraint("total_limit >= 1 AND hourly_limit >= 1", name="limits_are_positive"),
    sqlite_autoincrement=True,
)

# One accepted message: what the SMTP server answered 250 for. Its recipients are in `recipients`,
# its bytes in `message_contents` (kept apart so scans of this table never read message bodies).
messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # The id named in the 250 reply and in the Received header.
    sa.Column("queue_id", sa.String(32), nullable=False, unique=True),
    # NULL for a bounce report: PowerEmail sends those itself, under no SMTP user's limits.
    sa.Column("smtp_user_id", sa.Integer, sa.ForeignKey("smtp_users.id"), nullable=True),
    sa.Column("mail_from", sa.String(512), nullable=False),  # "" for the null sender <>
    sa.Column("recipient_count", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    sa.Column("accepted_at", UtcDateTime(), nullable=False),
    # The user's sent_total once this message was counted. The rolling hour of SPEC §3 is then two
    # index lookups however much the user sends, not a sum over every message of the hour:
    #   sent in the last hour = sent_total - sent_total_after of the newest message older than 1 h;
    #   sending resumes 1 h after the first message whose sent_total_after reaches what must expire.
    sa.Column("sent_total_after", sa.BigInteger, nullable=False),
    # For a bounce report (RFC 3464): the message whose recipients it reports on.
    sa.Column("bounce_of", sa.Integer, sa.ForeignKey("messages.id"), nullable=True),
    sa.Index("ix_messages_smtp_user_id_accepted_at", "smtp_user_id", "accepted_at"),
    sa.Index("ix_messages_smtp_user_id_sent_total_after", "smtp_user_id", "sent_total_after"),
    sqlite_autoincrement=True,
)

message_contents = sa.Table(
    "message_contents",
    metadata,
    sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id"), primary_key=True),
    # The message as stored: CRLF line endings, our Received header (and Message-ID if it had none).
    # Empty when the message was written ahead in `message_parts` (then `parts` says in how many).
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("parts", sa.Integer, nullable=True),
)

# A large message's bytes, written ahead in pieces of their own transactions before the one that
# queues it (store/message_parts.py): one commit of 25 MiB held every other writer for its length.
# Found by the queue id the message will have; pieces no message names are swept after a while.
message_parts = sa.Table(
    "message_parts",
    metadata,
    sa.Column("queue_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    # Before `data`: SQLite reads a column after a large blob only by following its overflow pages.
    sa.Column("created_at", UtcDateTime(), nullable=False, index=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

recipients = sa.Table(
    "recipients",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id"), nullable=False, index=True),
    sa.Column("address", sa.String(512), nullable=False),
    # The address's domain, lower case: recipients of one message for one domain go in one SMTP
    # transaction, and the MX lookup is per domain.
    sa.Column("domain", sa.String(255), nullable=False),
    # queued → (deferred →)* delivered | bounced (SPEC §5).
    sa.Column("state", sa.String(16), nullable=False, server_default="queued"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # When the recipient is due: its acceptance time, then each retry's.
    sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
    sa.Column("last_attempt_at", UtcDateTime(), nullable=True),
    # The last attempt's outcome: the remote server's reply ("550 5.1.1 …") or what went wrong
    # before one ("connection refused by mx.example.com[192.0.2.1]:25").
    sa.Column("last_reply", sa.String(1000), nullable=True),
    sa.Column("remote_mta", sa.String(255), nullable=True),
    # The delivery lease: which worker holds the recipient, until when. A worker that dies has its
    # recipients taken again once locked_until passes (SPEC §5 crash safety).
    sa.Column("locked_by", sa.String(128), nullable=True),
    sa.Column("locked_until", UtcDateTime(), nullable=True),
    sa.CheckConstraint("state IN ('queued', 'deferred', 'delivered', 'bounced')", name="state_is_known"),
    sa.CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    # What the delivery worker scans: only recipients still to deliver, by due time.
    sa.Index(
        "ix_recipients_due",
        "next_attempt_at",
        sqlite_where=sa.text("state IN ('queued', 'deferred')"),
        postgresql_where=sa.text("state IN ('queued', 'deferred')"),
    ),
    sqlite_autoincrement=True,
)
