"""SPEC §4: 250 after DATA means the message is on stable storage, so a crash one instant later loses
nothing; SPEC §3: a message is queued and counted, or neither. And the limits, being counted in
the store, outlast the process."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.smtp import replies
from poweremail.store.message_parts import PART_SIZES, write_part
from poweremail.store.schema import message_parts
from poweremail.store.submissions import UNCLAIMED_PARTS_AGE
from tests.smtp.helpers import SmtpUser, add_smtp_user, usage
from tests.smtp.letters import (
    Letter,
    Outcome,
    assert_queued_as_acknowledged,
    assert_whole,
    connect,
    queued_messages,
    resume_at_text,
    submit,
    transact,
)
from tests.support import ServerProcess, create_owner, store_read, store_write

SENDERS = 6  # sessions sending at once when the process dies
ACKNOWLEDGED_BEFORE_KILL = 30


class Node:
    """A ``poweremail serve`` on this test's database and data dir that can be restarted."""

    def __init__(self, database_url: str, directory: Path) -> None:
        self.database_url = database_url
        self.directory = directory
        self.starts = 0
        self.process = self._start()

    def _start(self) -> ServerProcess:
        self.starts += 1
        return ServerProcess(
            data_dir=self.directory / "data",
            database_url=self.database_url,
            log_path=self.directory / f"serve-{self.starts}.log",
        ).start()

    def restart(self, how: Literal["kill", "stop"]) -> ServerProcess:
        if how == "kill":
            self.process.kill()
        else:
            assert self.process.stop() == 0, self.process.log()
        self.process = self._start()
        return self.process


@pytest.fixture
def node(database_url: str, tmp_path: Path) -> Iterator[Node]:
    node = Node(database_url, tmp_path)
    yield node
    if node.process.process is not None and node.process.process.poll() is None:
        node.process.stop()


class KillAfter:
    """Counts 250 replies across threads; the one that gets the ``limit``-th kills the server."""

    def __init__(self, server: ServerProcess, limit: int) -> None:
        self.server = server
        self.limit = limit
        self.acknowledged: list[Outcome] = []
        self.killed = threading.Event()
        self._lock = threading.Lock()

    def record(self, outcome: Outcome) -> None:
        assert outcome.queue_id is not None, outcome.reply
        with self._lock:
            self.acknowledged.append(outcome)  # a 250 read after the kill was still sent before it
            if len(self.acknowledged) == self.limit:
                self.killed.set()  # first: the other sessions must know their errors are expected
                self.server.kill()  # SIGKILL: no shutdown code runs

    def send_until_killed(self, sender: int, user: SmtpUser) -> int:
        """One session sending letters of 1-3 recipients; returns how many it began but got no
        reply to (at most one: the letter in flight when the server died)."""
        in_flight = 0
        try:
            with connect(self.server.smtp_port, user) as client:
                for number in itertools.count(sender):
                    letter = Letter.to(1 + number % 3)
                    in_flight = 1
                    outcome = transact(client, letter)
                    in_flight = 0
                    self.record(outcome)
                    if self.killed.is_set():
                        return 0
        except OSError:  # smtplib's errors are OSErrors: the server died mid-session
            if not self.killed.is_set():
                raise
        return in_flight


def test_every_acknowledged_message_survives_sigkill(node: Node, database_url: str) -> None:
    owner = create_owner(database_url)
    user = add_smtp_user(node.process, owner, total_limit=1_000_000, hourly_limit=1_000_000)
    killer = KillAfter(node.process, ACKNOWLEDGED_BEFORE_KILL)
    with ThreadPoolExecutor(max_workers=SENDERS) as pool:
        in_flight = sum(pool.map(killer.send_until_killed, range(SENDERS), [user] * SENDERS))
    assert killer.killed.is_set()
    assert len(killer.acknowledged) >= ACKNOWLEDGED_BEFORE_KILL

    server = node.restart("kill")  # already dead: this only starts it again
    queued = queued_messages(database_url, user)
    assert_queued_as_acknowledged(queued, killer.acknowledged)
    assert_whole(queued)
    # What committed without its 250 reaching us: at most the one letter in flight per session.
    assert len(queued) - len(killer.acknowledged) <= in_flight
    # Counted exactly what is queued: no counted-but-lost message, no queued-but-uncounted one.
    counted = sum(message.recipient_count for message in queued.values())
    assert usage(server, owner, user) == (counted, counted)

    # And the restarted node takes mail again.
    after = submit(server.smtp_port, user, Letter.to(2))
    assert after.queue_id is not None, after.reply
    assert_queued_as_acknowledged(queued_messages(database_url, user), [after])
    assert usage(server, owner, user) == (counted + 2, counted + 2)


def test_sequential_messages_survive_sigkill_right_after_the_last_250(node: Node, database_url: str) -> None:
    owner = create_owner(database_url)
    user = add_smtp_user(node.process, owner)
    with connect(node.process.smtp_port, user) as client:
        outcomes = [transact(client, Letter.to(1 + n % 3)) for n in range(5)]
        node.process.kill()  # before QUIT, right after the last 250
    assert all(o.queue_id is not None for o in outcomes), [o.reply for o in outcomes]

    server = node.restart("kill")
    queued = queued_messages(database_url, user)
    assert sorted(queued) == sorted(str(o.queue_id) for o in outcomes)
    assert_queued_as_acknowledged(queued, outcomes)
    assert usage(server, owner, user) == (1 + 2 + 3 + 1 + 2, 1 + 2 + 3 + 1 + 2)


def _parts_by_message(database_url: str) -> dict[str, int]:
    def read(conn: Connection) -> dict[str, int]:
        rows = conn.execute(
            sa.select(message_parts.c.queue_id, sa.func.count()).group_by(message_parts.c.queue_id)
        )
        return {queue_id: count for queue_id, count in rows}

    return store_read(database_url, read)


def test_a_large_message_survives_sigkill_and_a_dead_upload_is_swept_at_start(
    node: Node, database_url: str
) -> None:
    """A message large enough to be written ahead in parts is as durable as any once it has its
    250; parts a dead node left without a message are deleted when a node starts."""
    owner = create_owner(database_url)
    user = add_smtp_user(node.process, owner)
    letter = Letter.to(2, filler=3 * 1024 * 1024 // 78)
    outcome = submit(node.process.smtp_port, user, letter)
    assert outcome.queue_id is not None, outcome.reply
    node.process.kill()
    # What a node killed between the parts and the transaction queueing their message leaves.
    long_ago = datetime.now(UTC) - UNCLAIMED_PARTS_AGE - timedelta(minutes=1)
    store_write(
        database_url,
        lambda conn: write_part(conn, queue_id="QDEADUPLOAD", seq=0, data=b"x" * 1000, now=long_ago),
    )
    parts = _parts_by_message(database_url)
    assert parts.pop("QDEADUPLOAD") == 1 and list(parts) == [outcome.queue_id], parts

    server = node.restart("kill")
    queued = queued_messages(database_url, user)
    assert_queued_as_acknowledged(queued, [outcome])
    stored = queued[outcome.queue_id].data
    assert stored is not None and stored.endswith(b"\r\n\r\n" + letter.body()), len(stored or b"")
    part_size = PART_SIZES["sqlite" if database_url.startswith("sqlite") else "postgresql"]
    assert parts[outcome.queue_id] == -(-len(stored) // part_size)
    deadline = time.monotonic() + 10
    while _parts_by_message(database_url) != parts:
        assert time.monotonic() < deadline, (_parts_by_message(database_url), server.log())
        time.sleep(0.05)


def _fill(server: ServerProcess, user: SmtpUser, counts: list[int]) -> list[Outcome]:
    outcomes = [submit(server.smtp_port, user, Letter.to(count)) for count in counts]
    assert all(o.queue_id is not None for o in outcomes), [o.reply for o in outcomes]
    return outcomes


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_limits_and_usage_survive_a_restart(
    node: Node, database_url: str, how: Literal["kill", "stop"]
) -> None:
    owner = create_owner(database_url)
    total_user = add_smtp_user(node.process, owner, total_limit=5, hourly_limit=1000)
    hourly_user = add_smtp_user(node.process, owner, total_limit=1000, hourly_limit=4)
    _fill(node.process, total_user, [2, 3])
    _fill(node.process, hourly_user, [1, 3])

    server = node.restart(how)
    assert usage(server, owner, total_user) == (5, 5)
    assert usage(server, owner, hourly_user) == (4, 4)

    refused = submit(server.smtp_port, total_user, Letter.to(1))
    assert (refused.stage, refused.reply) == ("RCPT", replies.TOTAL_LIMIT.format(limit=5))

    # The hourly window is read back from the store: sending resumes when the first message
    # (1 recipient) leaves the rolling hour.
    first = min(queued_messages(database_url, hourly_user).values(), key=lambda m: m.accepted_at)
    assert first.recipient_count == 1
    refused = submit(server.smtp_port, hourly_user, Letter.to(1))
    expected = replies.HOURLY_LIMIT.format(limit=4, resume_at=resume_at_text(first.accepted_at))
    assert (refused.stage, refused.reply) == ("RCPT", expected)

    # The refusals counted nothing.
    assert usage(server, owner, total_user) == (5, 5)
    assert usage(server, owner, hourly_user) == (4, 4)
    for user in (total_user, hourly_user):
        assert len(queued_messages(database_url, user)) == 2


def test_the_hourly_window_reads_back_in_utc_whatever_the_local_time_zone(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal names when sending resumes in UTC ("...Z"): an hour after the oldest message in
    the window was accepted, whatever time zone the server's machine is set to."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, no daylight saving; the child inherits it
    node = Node(database_url, tmp_path)
    try:
        owner = create_owner(database_url)
        user = add_smtp_user(node.process, owner, total_limit=1000, hourly_limit=1)
        _fill(node.process, user, [1])
        [message] = queued_messages(database_url, user).values()
        refused = submit(node.process.smtp_port, user, Letter.to(1))
        expected = replies.HOURLY_LIMIT.format(limit=1, resume_at=resume_at_text(message.accepted_at))
        assert (refused.stage, refused.reply) == ("RCPT", expected)
    finally:
        node.process.stop()
