"""Group commit of accepted mail (store/submissions.py), on both stores: messages finishing together
share one write transaction, each still gets its own outcome, and one bad message does not take the
others down with it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.domain.limits import Limits, Usage
from poweremail.store import delivery_queue, message_parts, messages
from poweremail.store.database import Database
from poweremail.store.message_parts import PART_SIZES
from poweremail.store.schema import message_contents, smtp_users
from poweremail.store.schema import message_parts as message_parts_table
from poweremail.store.schema import messages as messages_table
from poweremail.store.submissions import (
    LARGE_MESSAGE,
    UNCLAIMED_PARTS_AGE,
    SenderStates,
    SubmissionWriter,
    delete_unclaimed_parts,
)
from tests.store.test_time import _migrate
from tests.store.test_usage import _user
from tests.support import run, store_read, store_write


class CountingDatabase(Database):
    """The real store, counting the write transactions it is given."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.writes = 0
        self.alone = 0  # of which written alone (never in a batch with others)

    async def write(self, work: Any, *, alone: bool = False) -> Any:
        self.writes += 1
        self.alone += alone
        return await super().write(work, alone=alone)


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


def _sized_request(user_id: int, queue_id: str, size: int) -> messages.QueueRequest:
    head = b"Subject: large\r\n\r\n"
    lines, rest = divmod(size - len(head), 1000)
    data = head + (b"x" * 998 + b"\r\n") * lines + b"y" * rest
    assert len(data) == size
    return dataclasses.replace(_request(user_id, queue_id), data=data)


def _large_request(user_id: int, queue_id: str) -> messages.QueueRequest:
    return _sized_request(user_id, queue_id, LARGE_MESSAGE + 100_000)


def _part_sizes(url: str, size: int) -> list[int]:
    """The sizes of the parts a message of ``size`` octets is written in on that store."""
    part_size = PART_SIZES["sqlite" if url.startswith("sqlite") else "postgresql"]
    whole, rest = divmod(size, part_size)
    return [part_size] * whole + ([rest] if rest else [])


def _parts_of(url: str) -> dict[str, list[int]]:
    """Each queue id in message_parts, with the sizes of its parts in order."""
    return store_read(
        url,
        lambda conn: {
            queue_id: [len(part) for part in parts]
            for queue_id, parts in message_parts.read_parts(
                conn, conn.scalars(sa.select(message_parts_table.c.queue_id).distinct()).all()
            ).items()
        },
    )


def test_a_large_message_is_written_ahead_in_parts_of_their_own(database_url: str) -> None:
    """A message of LARGE_MESSAGE octets or more is written in parts, each a write transaction of
    its own (on SQLite never batched with others): the small messages finishing with it do not wait
    for one long COMMIT. It is queued and counted as any other, and delivery reads it back whole."""
    run(_migrate(database_url))
    user_id = store_write(database_url, lambda conn: _user(conn, hourly_limit=100))
    large = _large_request(user_id, "QL0")
    parts = len(_part_sizes(database_url, large.size))
    requests = [_request(user_id, f"QS{i}") for i in range(10)]
    requests.insert(5, large)
    database = CountingDatabase(database_url)

    outcomes, writes, _ = run(_queue_all(database_url, requests, database))

    assert outcomes == [messages.Queued(r.queue_id) for r in requests]
    assert database.alone == parts and writes - parts < 6, (database.alone, writes)
    assert _sent_total(database_url, user_id) == 11
    assert _parts_of(database_url) == {"QL0": _part_sizes(database_url, large.size)}

    def read(conn: Connection) -> tuple[Any, dict[int, Any]]:
        row = conn.execute(
            sa.select(
                messages_table.c.id,
                messages_table.c.size_bytes,
                message_contents.c.data,
                message_contents.c.parts,
            )
            .join(message_contents, message_contents.c.message_id == messages_table.c.id)
            .where(messages_table.c.queue_id == "QL0")
        ).one()
        return row, delivery_queue.load_messages(conn, [row.id])

    row, loaded = store_read(database_url, read)
    assert (row.size_bytes, row.data, row.parts) == (large.size, b"", parts)
    assert loaded[row.id].data == large.data


def test_a_message_just_under_the_large_size_goes_whole_into_its_batch(database_url: str) -> None:
    run(_migrate(database_url))
    user_id = store_write(database_url, lambda conn: _user(conn, hourly_limit=100))
    requests = [
        _sized_request(user_id, "QU0", LARGE_MESSAGE - 1),
        _sized_request(user_id, "QU1", LARGE_MESSAGE),
    ]
    database = CountingDatabase(database_url)

    outcomes, _, _ = run(_queue_all(database_url, requests, database))

    assert outcomes == [messages.Queued("QU0"), messages.Queued("QU1")]
    assert database.alone == len(_part_sizes(database_url, LARGE_MESSAGE))
    assert _parts_of(database_url) == {"QU1": _part_sizes(database_url, LARGE_MESSAGE)}
    stored = store_read(
        database_url,
        lambda conn: conn.execute(
            sa.select(message_contents.c.data, message_contents.c.parts)
            .join(messages_table, messages_table.c.id == message_contents.c.message_id)
            .where(messages_table.c.queue_id == "QU0")
        ).one(),
    )
    assert (stored.data, stored.parts) == (requests[0].data, None)


def test_a_refused_large_message_leaves_no_parts(database_url: str) -> None:
    run(_migrate(database_url))
    user_id = store_write(database_url, lambda conn: _user(conn, hourly_limit=100))
    revoked = dataclasses.replace(_large_request(user_id, "QR0"), credential_version=2)

    outcomes, _, _ = run(_queue_all(database_url, [revoked]))

    assert outcomes == [messages.CredentialsRevoked()]
    assert _parts_of(database_url) == {}
    assert _sent_total(database_url, user_id) == 0


def test_parts_no_message_names_are_deleted_once_old(database_url: str) -> None:
    """What a node that died between the parts and the queueing transaction left: deleted once
    older than any upload can take; the parts of queued messages, and young ones, stay."""
    run(_migrate(database_url))
    user_id = store_write(database_url, lambda conn: _user(conn, hourly_limit=100))
    long_ago = datetime.now(UTC) - UNCLAIMED_PARTS_AGE - timedelta(minutes=1)
    queued = dataclasses.replace(_large_request(user_id, "QOLD"), now=long_ago)
    outcomes, _, _ = run(_queue_all(database_url, [queued]))
    assert outcomes == [messages.Queued("QOLD")]

    def leave_parts(conn: Connection) -> None:
        for queue_id, now in (("QDEAD", long_ago), ("QUPLOADING", datetime.now(UTC))):
            for seq in range(2):
                message_parts.write_part(conn, queue_id=queue_id, seq=seq, data=b"x" * 10, now=now)

    store_write(database_url, leave_parts)

    async def sweep() -> int:
        database = Database(database_url)
        try:
            return await delete_unclaimed_parts(database)
        finally:
            await database.close()

    assert run(sweep()) == 2
    left = {"QOLD": _part_sizes(database_url, queued.size), "QUPLOADING": [10, 10]}
    assert _parts_of(database_url) == left
    assert run(sweep()) == 0


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
