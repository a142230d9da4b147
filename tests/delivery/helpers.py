"""Helpers for the delivery tests: a node that delivers, mail sent through it, recipient states."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.schema import messages, recipients
from tests.smtp.helpers import SmtpUser, add_smtp_user, logged_in, queue_id_of
from tests.support import Owner, ServerProcess, store_read

# What makes a test node fast: retries after 0.2 s, and a look at the queue every 0.1 s.
FAST_DELIVERY = ("--retry-delays", "0.2", "--delivery-poll-interval", "0.1")


def smtp_user(node: ServerProcess, owner: Owner) -> SmtpUser:
    return add_smtp_user(node, owner, total_limit=100_000, hourly_limit=100_000)


@dataclass(frozen=True)
class RecipientState:
    address: str
    state: str
    attempts: int
    last_reply: str | None
    next_attempt_at: datetime


def send(
    server: ServerProcess, user: SmtpUser, mail_from: str, rcpt_tos: list[str], data: bytes | str
) -> str:
    """Submit one message through the node's SMTP port; returns its queue id."""
    with logged_in(server, user) as client:
        client.ehlo()
        payload = data.encode() if isinstance(data, str) else data
        options = ["SMTPUTF8"] if not all(a.isascii() for a in [mail_from, *rcpt_tos]) else []
        client.mail(mail_from, options)
        for address in rcpt_tos:
            code, reply = client.rcpt(address)
            assert code == 250, reply
        code, reply = client.data(payload)
        assert code == 250, reply
        return queue_id_of(reply)


def recipient_states(server: ServerProcess, queue_id: str) -> list[RecipientState]:
    def read(conn: Connection) -> list[RecipientState]:
        rows = conn.execute(
            sa.select(
                recipients.c.address,
                recipients.c.state,
                recipients.c.attempts,
                recipients.c.last_reply,
                recipients.c.next_attempt_at,
            )
            .join(messages, messages.c.id == recipients.c.message_id)
            .where(messages.c.queue_id == queue_id)
            .order_by(recipients.c.id)
        ).all()
        return [RecipientState(*row) for row in rows]

    return store_read(server.database_url, read)


def wait_for_states(
    server: ServerProcess,
    queue_id: str,
    done: Callable[[list[RecipientState]], bool],
    what: str,
    timeout: float = 30,
) -> list[RecipientState]:
    deadline = time.monotonic() + timeout
    while True:
        states = recipient_states(server, queue_id)
        if done(states):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s; states {states}\n{server.log()[-3000:]}")
        time.sleep(0.05)


def all_in(*wanted: str) -> Callable[[list[RecipientState]], bool]:
    return lambda states: bool(states) and all(state.state in wanted for state in states)


def bounce_reports(server: ServerProcess) -> list[tuple[str, int]]:
    """Queued bounce reports: (queue id, id of the message reported on)."""

    def read(conn: Connection) -> list[tuple[str, int]]:
        rows = conn.execute(
            sa.select(messages.c.queue_id, messages.c.bounce_of).where(messages.c.bounce_of.is_not(None))
        ).all()
        return [(row.queue_id, row.bounce_of) for row in rows]

    return store_read(server.database_url, read)
