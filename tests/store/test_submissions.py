"""Group commit of accepted mail (store/submissions.py), on both stores: messages finishing together
share one write transaction, each still gets its own outcome, and one bad message does not take the
others down with it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.domain.limits import Limits, Usage
from poweremail.store import messages
from poweremail.store.database import Database
from poweremail.store.schema import message_contents, smtp_users
from poweremail.store.schema import messages as messages_table
from poweremail.store.submissions import LARGE_MESSAGE, SenderStates, SubmissionWriter
from tests.store.test_time import _migrate
from tests.store.test_usage import _user
from tests.support import run, store_read, store_write


class CountingDatabase(Database):
    """The real store, counting the write transactions it is given."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.writes = 0
        self.alone: list[int] = []  # for each write alone: how many messages it wrote

    async def write(self, work: Any, *, alone: bool = False) -> Any:
        self.writes += 1
        result = await super().write(work, alone=alone)
        if alone:
            self.alone.append(len(result.outcomes))
        return result


def _request(user_id: int, queue_id: str, *, recipients: int = 1) -> messages.QueueRequest:
    return messages.QueueRequest(
        smtp_user_id=user_id, credential_version=1, queue_id=queue_id, mail_from="a@example.com",
        rcpt_tos=[f"r{i}@example.com" for i in range(recipients)], data=b"Subject: x\r\n\r\nx\r\n",
        now=datetime.now(UTC),
    )  # fmt: skip


async def _queue_all(
    url: str, requests: list[messages.QueueRequest], database: CountingDatabase | None = None
) -> tuple[list[object], int, SenderStates]:
    database = database or CountingDatabase(url)
    senders = SenderStates()
    writer = SubmissionWriter(database, senders)
    try:
        outcomes = await asyncio.gather(*(writer.queue(r) for r in requests), return_exceptions=True)
    finally:
        await database.close()
    return list(outcomes), database.writes, senders


def _sent_total(url: str, user_id: int) -> int:
    return store_read(
        url,
        lambda conn: conn.execute(
            sa.select(smtp_users.c.sent_total).where(smtp_users.c.id == user_id)
        ).scalar_one(),
    )


def test_messages_finishing_together_share_a_transaction(database_url: str) -> None:
    run(_migrate(database_url))
    user_id = store_write(database_url, lambda conn: _user(conn, hourly_limit=30))
    requests = [_request(user_id, f"QG{i}") for i in range(40)]

    outcomes, writes, senders = run(_queue_all(database_url, requests))

    # 30 fit the hourly limit, in the order they came; the other 10 are refused for the hour.
    assert outcomes[:30] == [messages.Queued(f"QG{i}") for i in range(30)]
    assert all(isinstance(outcome, messages.OverLimit) for outcome in outcomes[30:])
    assert writes < len(requests) / 4, f"{writes} write transactions for {len(requests)} messages"
    assert _sent_total(database_url, user_id) == 30
    # The batch left the sender's state as it stands now, for the next MAIL.
    state = senders.fresh(user_id)
    assert state is not None and state.usage == Usage(30, 30) and state.limits == Limits(1000, 30)


def test_a_large_message_is_written_alone_beside_the_batches(database_url: str) -> None:
    """A message of LARGE_MESSAGE octets or more gets a write transaction of its own (on SQLite not
    batched with any other): the small messages finishing with it do not wait for its COMMIT."""
    run(_migrate(database_url))
    user_id = store_write(database_url, lambda conn: _user(conn, hourly_limit=100))
    body = (b"x" * 998 + b"\r\n") * (LARGE_MESSAGE // 1000 + 1)
    large = dataclasses.replace(_request(user_id, "QL0"), data=b"Subject: large\r\n\r\n" + body)
    requests = [_request(user_id, f"QS{i}") for i in range(10)]
    requests.insert(5, large)
    database = CountingDatabase(database_url)

    outcomes, writes, _ = run(_queue_all(database_url, requests, database))

    assert outcomes == [messages.Queued(r.queue_id) for r in requests]
    assert database.alone == [1] and writes < 6, (database.alone, writes)
    assert _sent_total(database_url, user_id) == 11
    stored = store_read(
        database_url,
        lambda conn: conn.execute(
            sa.select(message_contents.c.data)
            .join(messages_table, messages_table.c.id == message_contents.c.message_id)
            .where(messages_table.c.queue_id == "QL0")
        ).scalar_one(),
    )
    assert stored == large.data


def test_one_bad_message_does_not_refuse_the_others(database_url: str) -> None:
    run(_migrate(database_url))

    def setup(conn: Connection) -> int:
        user_id = _user(conn, hourly_limit=100)
        messages.queue_message(
            conn, smtp_user_id=user_id, credential_version=1, queue_id="QTAKEN", mail_from="a@example.com",
            rcpt_tos=["b@example.com"], data=b"x", now=datetime.now(UTC),
        )  # fmt: skip
        return user_id

    user_id = store_write(database_url, setup)
    # A queue id already in the store makes its insert fail, and with it the batch's statement.
    requests = [_request(user_id, f"QB{i}") for i in range(5)]
    requests.insert(2, _request(user_id, "QTAKEN"))

    outcomes, _, _ = run(_queue_all(database_url, requests))

    assert isinstance(outcomes[2], sa.exc.IntegrityError)
    assert [outcome for i, outcome in enumerate(outcomes) if i != 2] == [
        messages.Queued(f"QB{i}") for i in range(5)
    ]
    assert _sent_total(database_url, user_id) == 1 + 5  # the failed one is not counted


def test_a_sender_state_is_used_only_while_fresh() -> None:
    senders = SenderStates(max_age=0.05)
    state = messages.SenderState(
        may_send=True, credential_version=1, limits=Limits(10, 10), usage=Usage(0, 0), last_accepted_at=None
    )
    senders.remember(7, state)
    assert senders.fresh(7) == state
    time.sleep(0.06)
    assert senders.fresh(7) is None
    senders.remember(7, state)
    senders.forget_all()
    assert senders.fresh(7) is None
    senders.remember(7, state)
    senders.remember(7, None)  # the user is gone
    assert senders.fresh(7) is None


def test_stale_sender_states_are_dropped_as_the_map_grows() -> None:
    senders = SenderStates(max_age=0.05, prune_above=100)
    state = messages.SenderState(
        may_send=True, credential_version=1, limits=Limits(10, 10), usage=Usage(0, 0), last_accepted_at=None
    )
    for user_id in range(100):
        senders.remember(user_id, state)
    time.sleep(0.06)
    senders.remember(1000, state)  # the 101st: the 100 stale ones go
    assert len(senders) == 1 and senders.fresh(1000) == state
