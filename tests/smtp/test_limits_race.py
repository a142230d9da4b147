"""SPEC §3: limits are exact under concurrency. Many sessions, on one node or on two nodes sharing a
database, race for the last units of an SMTP user's limit: exactly the limit is accepted, never one
recipient more, and the counters and the queue agree with the 250 replies.

Each round is a fresh SMTP user whose limit is far below the demand. Sessions send one message of
1, 2 or 3 recipients. There are more one-recipient messages than the limit, so at least one is
refused, and a refused one-recipient message proves the limit was full: the accepted recipients
must then be exactly the limit.

"lockstep": every session gets through MAIL and RCPT (the early check reads an empty usage) and
then all send DATA together, so the authoritative check at the end of DATA decides every race.
"free": sessions run unsynchronised, so the early check at RCPT refuses some of them as well.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from poweremail.smtp import replies
from tests.smtp.helpers import SmtpUser, add_smtp_user, usage
from tests.smtp.letters import (
    Letter,
    Outcome,
    assert_queued_as_acknowledged,
    assert_whole,
    queued_messages,
    resume_at_text,
    submit,
)
from tests.support import Owner, ServerProcess, create_owner

Which = Literal["hourly", "total"]
Mode = Literal["lockstep", "free"]

UNLIMITED = 1_000_000
# The shared server takes the default 50 sessions per client address; stay well under it.
SESSIONS_ONE_NODE = 40
SESSIONS_TWO_NODES = 80
ROUNDS = 3
FIRST_LIMIT = 7


def recipient_counts(sessions: int) -> list[int]:
    return [1 + i % 3 for i in range(sessions)]


@dataclass(frozen=True)
class Round:
    user: SmtpUser
    which: Which
    limit: int


def new_round(server: ServerProcess, owner: Owner, which: Which, limit: int) -> Round:
    if which == "hourly":
        user = add_smtp_user(server, owner, total_limit=UNLIMITED, hourly_limit=limit)
    else:
        user = add_smtp_user(server, owner, total_limit=limit, hourly_limit=UNLIMITED)
    return Round(user, which, limit)


def race(ports: Sequence[int], user: SmtpUser, counts: Sequence[int], mode: Mode) -> list[Outcome]:
    """One thread and one session per count, on ``ports`` in turn; in lockstep all DATA at once."""
    barrier = threading.Barrier(len(counts), timeout=60)

    def contend(index: int, count: int) -> Outcome:
        try:
            before_data = barrier.wait if mode == "lockstep" else None
            return submit(ports[index % len(ports)], user, Letter.to(count), before_data=before_data)
        except BaseException:
            barrier.abort()  # the others stop waiting for this one
            raise

    with ThreadPoolExecutor(max_workers=len(counts)) as pool:
        futures = [pool.submit(contend, index, count) for index, count in enumerate(counts)]
        return [future.result() for future in futures]


def expected_refusal(game: Round) -> Callable[[str], bool]:
    if game.which == "total":
        total_reply = replies.TOTAL_LIMIT.format(limit=game.limit)
        return lambda reply: reply == total_reply
    prefix = replies.HOURLY_LIMIT.partition("{resume_at}")[0].format(limit=game.limit)
    return lambda reply: reply.startswith(prefix)


def check_round(
    game: Round, outcomes: list[Outcome], *, api: ServerProcess, owner: Owner, database_url: str, mode: Mode
) -> None:
    counts = [len(o.letter.recipients) for o in outcomes]
    assert counts.count(1) > game.limit, "the round must refuse some one-recipient message"

    accepted = [o for o in outcomes if o.queue_id is not None]
    refused = [o for o in outcomes if o.queue_id is None]
    is_refusal = expected_refusal(game)
    unexpected = [o.reply for o in refused if not is_refusal(o.reply)]
    assert unexpected == [], f"replies other than the {game.which} limit's: {unexpected[:5]}"
    if mode == "lockstep":  # every RCPT came before any DATA: the early check had nothing to see
        assert {o.stage for o in refused} <= {"DATA"}

    accepted_recipients = sum(len(o.letter.recipients) for o in accepted)
    assert accepted_recipients == game.limit, (
        f"{accepted_recipients} recipients accepted against a {game.which} limit of {game.limit}"
    )

    assert usage(api, owner, game.user) == (game.limit, game.limit)  # sent_total, sent_last_hour

    stored = queued_messages(database_url, game.user)
    assert sorted(stored) == sorted(str(o.queue_id) for o in accepted)
    assert_queued_as_acknowledged(stored, accepted)
    assert_whole(stored)

    if game.which == "hourly":  # each refusal names when one of the accepted messages leaves the hour
        resumes = {resume_at_text(m.accepted_at) for m in stored.values()}
        for outcome in refused:
            assert outcome.reply.rpartition(" ")[2] in resumes, (outcome.reply, resumes)


# --- one node, many sessions ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lockstep", "free"])
@pytest.mark.parametrize("which", ["hourly", "total"])
def test_concurrent_sessions_get_exactly_the_limit(
    server: ServerProcess, owner: Owner, which: Which, mode: Mode
) -> None:
    for number in range(ROUNDS):
        game = new_round(server, owner, which, FIRST_LIMIT + number)
        outcomes = race([server.smtp_port], game.user, recipient_counts(SESSIONS_ONE_NODE), mode)
        check_round(game, outcomes, api=server, owner=owner, database_url=server.database_url, mode=mode)


# --- two nodes, one database ----------------------------------------------------------------------


@pytest.fixture
def two_nodes(database_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two ``poweremail serve`` processes on one database (and one data dir: one keyring)."""
    nodes: list[ServerProcess] = []
    try:
        for name in ("a", "b"):  # one after the other: the first creates the key and certificate
            node = ServerProcess(
                data_dir=tmp_path / "data",
                database_url=database_url,
                log_path=tmp_path / f"serve-{name}.log",
                extra_args=("--max-connections-per-address", "1000"),
            )
            nodes.append(node.start())
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.parametrize("mode", ["lockstep", "free"])
def test_two_nodes_sharing_a_database_get_exactly_the_limit(
    two_nodes: tuple[ServerProcess, ServerProcess], database_url: str, mode: Mode
) -> None:
    first, second = two_nodes
    owner = create_owner(database_url)
    ports = [first.smtp_port, second.smtp_port]
    rounds: list[Which] = ["hourly", "total"] * ROUNDS
    for number, which in enumerate(rounds):
        game = new_round(first, owner, which, FIRST_LIMIT + number)
        outcomes = race(ports, game.user, recipient_counts(SESSIONS_TWO_NODES), mode)
        check_round(game, outcomes, api=first, owner=owner, database_url=database_url, mode=mode)
        assert usage(second, owner, game.user) == (game.limit, game.limit)
