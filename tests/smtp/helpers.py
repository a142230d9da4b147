"""Helpers for SMTP tests: SMTP users through the API, stored messages straight from the store."""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.schema import messages, recipients
from tests.support import Owner, ServerProcess, store_read, stored_bodies


@dataclass(frozen=True)
class SmtpUser:
    name: str
    password: str


def add_smtp_user(
    server: ServerProcess, owner: Owner, *, total_limit: int = 1000, hourly_limit: int = 1000
) -> SmtpUser:
    response = server.post("addSmtp", owner.creds(total_limit=total_limit, hourly_limit=hourly_limit))
    assert response.status_code == 200, response.text
    return SmtpUser(response.json()["smtp_user_name"], response.json()["smtp_password"])


def usage(server: ServerProcess, owner: Owner, user: SmtpUser) -> tuple[int, int]:
    listing = server.post("listSmtp", owner.creds()).json()["smtp_list"]
    [entry] = [e for e in listing if e["smtp_user_name"] == user.name]
    return entry["sent_total"], entry["sent_last_hour"]


def logged_in(server: ServerProcess, user: SmtpUser, *, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30, source_address=(source, 0))
    client.login(user.name, user.password)
    return client


def tls_context_trusting(server: ServerProcess) -> ssl.SSLContext:
    """Trusts the self-signed certificate the server generated into its data directory."""
    return ssl.create_default_context(cafile=str(Path(server.data_dir) / "tls" / "cert.pem"))


@dataclass(frozen=True)
class StoredMessage:
    mail_from: str
    recipients: list[str]
    data: bytes


def stored_message(server: ServerProcess, queue_id: str) -> StoredMessage | None:
    """The message the server queued under ``queue_id``, read straight from its store."""

    def read(conn: Connection) -> StoredMessage | None:
        row = conn.execute(
            sa.select(messages.c.id, messages.c.mail_from).where(messages.c.queue_id == queue_id)
        ).first()
        if row is None:
            return None
        addresses = conn.scalars(
            sa.select(recipients.c.address).where(recipients.c.message_id == row.id).order_by(recipients.c.id)
        ).all()
        return StoredMessage(row.mail_from, list(addresses), stored_bodies(conn, [row.id])[row.id])

    return store_read(server.database_url, read)


def queue_id_of(reply: bytes | str) -> str:
    text = reply.decode() if isinstance(reply, bytes) else reply
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].strip()
