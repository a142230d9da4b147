"""The delivery queue's contract (SPEC §5), on SQLite and on PostgreSQL: claims under a lease that
no two workers ever share, outcomes recorded only by the lease holder, a bounce queued in the same
transaction as the bounced state, and leases extended or given back only by their holder."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from poweremail.domain.limits import Usage
from poweremail.keyring import Keyring
from poweremail.store import delivery_queue, messages, owners, schema, smtp_users
from poweremail.store.database import Database, parse_url
from poweremail.store.delivery_queue import (
    AttemptRecord,
    ClaimedRecipient,
    FinalState,
    PlannedBounce,
    RecipientOutcome,
)
from tests.store.test_time import _migrate
from tests.support import create_owner, run, store_read, store_write

T = TypeVar("T")
T0 = datetime.now(UTC).replace(microsecond=0)
LEASE = timedelta(minutes=1)
SENDER = "sender@example.org"
DATA = b"From: sender@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


class BuildFailed(Exception):
    pass


@dataclass(frozen=True)
class Queue:
    """A fresh store with one SMTP user, and shortcuts to the functions under test."""

    url: str
    user_id: int

    def write(self, work: Callable[[Connection], T]) -> T:
        return store_write(self.url, work)

    def read(self, work: Callable[[Connection], T]) -> T:
        return store_read(self.url, work)

    def queue(self, *rcpts: str, at: datetime, mail_from: str = SENDER) -> tuple[int, list[int]]:
        """Queue one message as the SMTP server does; its id and its recipients' ids, in order."""
        return self.write(lambda conn: _queue(conn, self.user_id, list(rcpts), at=at, mail_from=mail_from))

    def claim(
        self, worker: str, *, now: datetime, limit: int = 100, until: datetime | None = None
    ) -> list[ClaimedRecipient]:
        return self.write(
            lambda conn: delivery_queue.claim_due(
                conn, worker=worker, now=now, until=until or now + LEASE, limit=limit
            )
        )

    def record(
        self,
        worker: str,
        *,
        now: datetime,
        outcomes: Sequence[RecipientOutcome],
        bounce: PlannedBounce | None = None,
    ) -> int:
        return self.record_all(worker, [AttemptRecord(now, outcomes, bounce)])

    def record_all(self, worker: str, records: Sequence[AttemptRecord]) -> int:
        return self.write(lambda conn: delivery_queue.record_attempts(conn, worker=worker, records=records))

    def rows(self) -> dict[int, Any]:
        """Every recipient row, by id."""
        return self.read(
            lambda conn: {row.id: row for row in conn.execute(sa.select(schema.recipients)).all()}
        )

    def bounces_of(self, message_id: int) -> list[Any]:
        return self.read(
            lambda conn: list(
                conn.execute(sa.select(schema.messages).where(schema.messages.c.bounce_of == message_id))
            )
        )


def _queue(
    conn: Connection, user_id: int, rcpts: list[str], *, at: datetime, mail_from: str = SENDER
) -> tuple[int, list[int]]:
    queue_id = f"Q{secrets.token_hex(8)}"
    outcome = messages.queue_message(
        conn, smtp_user_id=user_id, credential_version=1, queue_id=queue_id, mail_from=mail_from,
        rcpt_tos=rcpts, data=DATA, now=at,
    )  # fmt: skip
    assert outcome == messages.Queued(queue_id)
    message_id: int = conn.execute(
        sa.select(schema.messages.c.id).where(schema.messages.c.queue_id == queue_id)
    ).scalar_one()
    recipient_ids = list(
        conn.scalars(
            sa.select(schema.recipients.c.id)
            .where(schema.recipients.c.message_id == message_id)
            .order_by(schema.recipients.c.id)
        )
    )
    return message_id, recipient_ids


@pytest.fixture
def q(database_url: str, tmp_path: Path) -> Queue:
    run(_migrate(database_url))
    owner = create_owner(database_url)
    keyring = Keyring.load_or_create(tmp_path / "secret.key")

    def smtp_user(conn: Connection) -> int:
        owner_pk = owners.authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
        assert owner_pk is not None
        name, _password = smtp_users.create_smtp_user(
            conn, owner_pk=owner_pk, keyring=keyring, total_limit=100_000, hourly_limit=10_000
        )
        user_id: int = conn.execute(
            sa.select(schema.smtp_users.c.id).where(schema.smtp_users.c.name == name)
        ).scalar_one()
        return user_id

    return Queue(database_url, store_write(database_url, smtp_user))


def _outcome(
    recipient_id: int,
    state: FinalState,
    *,
    reply: str = "250 2.0.0 Ok: queued",
    next_at: datetime | None = None,
    mta: str | None = "mx.example.net",
) -> RecipientOutcome:
    return RecipientOutcome(recipient_id, state, next_at, reply, mta)


def _ids(claimed: Sequence[ClaimedRecipient]) -> list[int]:
    return [recipient.id for recipient in claimed]


class _Report:
    """A PlannedBounce's ``build`` that remembers what it was asked for."""

    def __init__(self, queue_id: str = "BOUNCE1", data: bytes = b"the report") -> None:
        self.queue_id = queue_id
        self.data = data
        self.calls: list[list[int]] = []

    def __call__(self, ids: Collection[int]) -> tuple[str, bytes]:
        self.calls.append(sorted(ids))
        return self.queue_id, self.data


def _never_built(ids: Collection[int]) -> tuple[str, bytes]:
    raise AssertionError(f"a bounce was built for {sorted(ids)}, none of which was recorded as bounced")


# --- claiming ---------------------------------------------------------------------------------


def test_claim_takes_due_recipients_oldest_due_first_at_most_limit_under_a_lease(q: Queue) -> None:
    # Queued in this order, so ids and due times do not agree (x is deferred to a later time).
    _, done = q.queue("d1@example.net", "d2@example.net", at=T0 - timedelta(minutes=60))
    _, [x] = q.queue("x@example.net", at=T0 - timedelta(minutes=50))
    a_message, [a] = q.queue("A@Example.NET", at=T0 - timedelta(minutes=30))
    _, [b1, b2] = q.queue("b1@example.net", "b2@example.net", at=T0 - timedelta(minutes=20))
    _, [c] = q.queue("c@example.com", at=T0 - timedelta(minutes=10))
    _, [future] = q.queue("later@example.com", at=T0 + timedelta(minutes=5))

    # The oldest two end delivered and bounced; x is deferred to 5 minutes before T0.
    early = T0 - timedelta(minutes=60)
    assert _ids(q.claim("setup", now=early)) == done
    q.record("setup", now=early, outcomes=[_outcome(done[0], "delivered"), _outcome(done[1], "bounced")])
    assert _ids(q.claim("setup", now=T0 - timedelta(minutes=50))) == [x]
    q.record(
        "setup",
        now=T0 - timedelta(minutes=50),
        outcomes=[_outcome(x, "deferred", reply="451 4.7.1 later", next_at=T0 - timedelta(minutes=5))],
    )

    until = T0 + timedelta(hours=1)
    first = q.claim("w1", now=T0, limit=1, until=until)
    assert first == [ClaimedRecipient(a, a_message, "A@Example.NET", "example.net", 0)]
    assert _ids(q.claim("w2", now=T0, limit=3, until=until)) == [b1, b2, c]
    third = q.claim("w3", now=T0, limit=3, until=until)
    assert _ids(third) == [x] and third[0].attempts == 1
    # Everything due is leased now; delivered, bounced and not-yet-due recipients are never taken.
    assert q.claim("w4", now=T0, until=until) == []
    assert q.claim("w4", now=T0 + timedelta(minutes=4, seconds=59), until=until) == []

    rows = q.rows()
    holders = {a: "w1", b1: "w2", b2: "w2", c: "w2", x: "w3"}
    assert {rid: (rows[rid].locked_by, rows[rid].locked_until) for rid in holders} == {
        rid: (worker, until) for rid, worker in holders.items()
    }
    # Claiming is not an attempt: nothing about the attempts changes.
    assert [(rows[rid].state, rows[rid].attempts, rows[rid].last_attempt_at) for rid in (a, b1, c)] == [
        ("queued", 0, None)
    ] * 3
    for rid in (*done, future):
        assert (rows[rid].locked_by, rows[rid].locked_until) == (None, None)
    assert (rows[done[0]].state, rows[done[1]].state) == ("delivered", "bounced")

    # Once due, the recipient accepted in the future is claimable; the leased ones still are not.
    assert _ids(q.claim("w4", now=T0 + timedelta(minutes=5), until=until)) == [future]
    assert q.claim("w5", now=T0 + timedelta(minutes=6), until=until) == []
    # Delivered and bounced stay untouched, even long after.
    assert _ids(q.claim("w6", now=T0 + timedelta(days=30))) == sorted([a, b1, b2, c, x, future])


def test_claim_respects_the_limit_among_many_due(q: Queue) -> None:
    _, ids = q.queue(*(f"r{i}@example.com" for i in range(12)), at=T0)
    batches = [q.claim(f"w{i}", now=T0, limit=5) for i in range(4)]
    assert [len(batch) for batch in batches] == [5, 5, 2, 0]
    assert sorted(rid for batch in batches for rid in _ids(batch)) == ids
    # Each batch comes in id order (the order a message's recipients were given).
    assert all(_ids(batch) == sorted(_ids(batch)) for batch in batches)


def test_an_expired_lease_is_claimed_again_and_a_live_one_is_not(q: Queue) -> None:
    _, [r1] = q.queue("r1@example.com", at=T0)
    _, [r2] = q.queue("r2@example.com", at=T0 + timedelta(seconds=1))
    assert _ids(q.claim("w1", now=T0, limit=1, until=T0 + timedelta(seconds=30))) == [r1]
    assert _ids(q.claim("w2", now=T0 + timedelta(seconds=1), until=T0 + timedelta(seconds=120))) == [r2]

    # A lease is live up to and including its locked_until.
    assert q.claim("w3", now=T0 + timedelta(seconds=30)) == []
    taken = q.claim("w3", now=T0 + timedelta(seconds=31), until=T0 + timedelta(minutes=5))
    assert _ids(taken) == [r1] and taken[0].attempts == 0
    rows = q.rows()
    assert (rows[r1].locked_by, rows[r1].locked_until) == ("w3", T0 + timedelta(minutes=5))
    assert (rows[r2].locked_by, rows[r2].locked_until) == ("w2", T0 + timedelta(seconds=120))

    # The first holder's late record no longer counts: the recipient is w3's now.
    late = T0 + timedelta(seconds=40)
    assert q.record("w1", now=late, outcomes=[_outcome(r1, "delivered")]) == 0
    rows = q.rows()
    untouched = ("queued", 0, "w3", None)
    assert (rows[r1].state, rows[r1].attempts, rows[r1].locked_by, rows[r1].last_reply) == untouched
    # An expired lease that nobody took meanwhile is still its holder's to record.
    assert q.record("w2", now=T0 + timedelta(minutes=3), outcomes=[_outcome(r2, "delivered")]) == 1
    assert q.rows()[r2].state == "delivered"


def test_records_of_several_transactions_in_one_call_each_keep_their_own_times_and_bounce(q: Queue) -> None:
    first_id, [bounced, delivered] = q.queue("gone@example.com", "ok@example.com", at=T0)
    second_id, [deferred, taken] = q.queue("later@example.com", "elsewhere@example.com", at=T0)
    assert _ids(q.claim("w1", now=T0, limit=3)) == [bounced, delivered, deferred]
    # The fourth is another worker's (as when w1's lease on it lapsed and w2 took it): w1's record of
    # it must not count.
    assert _ids(q.claim("w2", now=T0)) == [taken]
    at_first, at_second, retry_at = T0 + timedelta(seconds=40), T0 + timedelta(seconds=41), T0 + LEASE * 5
    first_report, second_report = _Report("BOUNCEA"), _Report("BOUNCEB")

    recorded = q.record_all(
        "w1",
        [
            AttemptRecord(
                at_first,
                [_outcome(bounced, "bounced", reply="550 5.1.1 gone"), _outcome(delivered, "delivered")],
                PlannedBounce(first_id, SENDER, first_report),
            ),
            AttemptRecord(
                at_second,
                [
                    _outcome(deferred, "deferred", reply="451 4.3.0 later", next_at=retry_at),
                    _outcome(taken, "bounced", reply="550 5.1.1 not w1's to say"),
                ],
                PlannedBounce(second_id, SENDER, second_report),
            ),
        ],
    )

    assert recorded == 3
    rows = q.rows()
    assert (rows[bounced].state, rows[bounced].last_attempt_at, rows[bounced].locked_by) == (
        "bounced",
        at_first,
        None,
    )
    assert (rows[delivered].state, rows[delivered].last_attempt_at) == ("delivered", at_first)
    assert (rows[deferred].state, rows[deferred].next_attempt_at, rows[deferred].last_attempt_at) == (
        "deferred",
        retry_at,
        at_second,
    )
    assert (rows[taken].state, rows[taken].attempts, rows[taken].locked_by) == ("queued", 0, "w2")
    # The first transaction's report names its bounced recipient; the second's would have named
    # only the one w2 holds, so it is not built at all.
    assert first_report.calls == [[bounced]] and second_report.calls == []
    assert len(q.bounces_of(first_id)) == 1 and q.bounces_of(second_id) == []


def test_times_in_any_time_zone_compare_as_instants(q: Queue) -> None:
    east, west = timezone(timedelta(hours=5)), timezone(timedelta(hours=-8))
    _, [rid] = q.queue("r@example.com", at=T0.astimezone(east))
    assert q.claim("w1", now=(T0 - timedelta(seconds=1)).astimezone(west)) == []
    assert _ids(q.claim("w1", now=T0.astimezone(west), until=(T0 + LEASE).astimezone(east))) == [rid]
    assert q.rows()[rid].locked_until == T0 + LEASE
    assert q.claim("w2", now=(T0 + LEASE).astimezone(west)) == []
    assert _ids(q.claim("w2", now=(T0 + LEASE + timedelta(seconds=1)).astimezone(east))) == [rid]


# --- many claimers at once --------------------------------------------------------------------


async def _claim_all_at_once(
    url: str, *, databases: int, claimers_per_database: int, limit: int, due: int
) -> list[tuple[str, list[int]]]:
    """Claimers on several Database objects (as on several nodes) claiming until nothing is left
    (or, should claims overlap, until twice what was due has been handed out)."""
    stores = [Database(url) for _ in range(databases)]
    claims: list[tuple[str, list[int]]] = []
    start = asyncio.Event()

    async def claimer(database: Database, worker: str) -> None:
        await start.wait()
        while sum(len(ids) for _worker, ids in claims) < 2 * due:
            claimed = await database.write(
                lambda conn: delivery_queue.claim_due(
                    conn, worker=worker, now=T0, until=T0 + LEASE, limit=limit
                )
            )
            claims.append((worker, _ids(claimed)))
            if not claimed:
                return

    try:
        tasks = [
            asyncio.create_task(claimer(database, f"node{n}-worker{w}"))
            for n, database in enumerate(stores)
            for w in range(claimers_per_database)
        ]
        start.set()
        await asyncio.gather(*tasks)
    finally:
        for database in stores:
            await database.close()
    return claims


@pytest.mark.parametrize("databases", [1, 3])
def test_concurrent_claims_never_overlap(q: Queue, databases: int) -> None:
    """500 due recipients, many claimers in flight at once (on PostgreSQL, each in its own
    connection and transaction): every recipient is claimed exactly once."""

    def queue_500(conn: Connection) -> list[int]:
        ids: list[int] = []
        for i in range(10):
            _, message_ids = _queue(conn, q.user_id, [f"r{i}-{j}@d{j % 7}.example" for j in range(50)], at=T0)
            ids += message_ids
        return ids

    all_ids = q.write(queue_500)
    assert len(all_ids) == 500

    limit = 7
    claims = run(
        _claim_all_at_once(q.url, databases=databases, claimers_per_database=8, limit=limit, due=len(all_ids))
    )

    assert all(len(ids) <= limit for _worker, ids in claims)
    counts = Counter(rid for _worker, ids in claims for rid in ids)
    assert sorted(rid for rid, n in counts.items() if n > 1) == [], "recipients claimed more than once"
    assert sorted(counts) == sorted(all_ids)
    # Each row is leased to the worker that was told it had it.
    rows = q.rows()
    assert {rid: rows[rid].locked_by for rid in all_ids} == {
        rid: worker for worker, ids in claims for rid in ids
    }
    assert len({worker for worker, ids in claims if ids}) > 1, "only one claimer ever got anything"
    assert q.claim("late", now=T0) == []


async def _claim_beside_an_open_claim(url: str) -> tuple[list[int], list[int], bool]:
    """w1's claim runs in a transaction left open; w2 claims meanwhile through another Database."""
    engine = create_async_engine(parse_url(url))
    other = Database(url)
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            first = await conn.run_sync(
                lambda sync: _ids(
                    delivery_queue.claim_due(sync, worker="w1", now=T0, until=T0 + LEASE, limit=3)
                )
            )
            second_claim = asyncio.create_task(
                other.write(
                    lambda sync: _ids(
                        delivery_queue.claim_due(sync, worker="w2", now=T0, until=T0 + LEASE, limit=10)
                    )
                )
            )
            done, _pending = await asyncio.wait([second_claim], timeout=5)
            await transaction.commit()
            second = await second_claim
    finally:
        await other.close()
        await engine.dispose()
    return first, second, bool(done)


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_claim_passes_by_rows_another_claim_holds_without_waiting(q: Queue) -> None:
    """PostgreSQL (SKIP LOCKED): while one worker's claim is not yet committed, another worker's claim
    neither waits for it nor takes its rows. (SQLite has one writer at a time: nothing to show.)"""
    _, ids = q.queue(*(f"r{i}@example.com" for i in range(6)), at=T0)
    first, second, second_did_not_wait = run(_claim_beside_an_open_claim(q.url))
    assert second_did_not_wait, "a claim waited for another claim's transaction to end"
    assert len(first) == 3 and sorted(first + second) == ids


# --- recording outcomes -----------------------------------------------------------------------


def test_record_outcomes_delivered_deferred_bounced_and_the_bounce(q: Queue) -> None:
    message_id, [delivered, deferred, bounced] = q.queue(
        "ok@example.com", "later@example.com", "gone@example.com", at=T0
    )
    assert len(q.claim("w1", now=T0)) == 3
    at = T0 + timedelta(seconds=10)
    retry_at = T0 + timedelta(minutes=5)
    report = _Report("BOUNCEQ1", b"Subject: Undelivered Mail\r\n\r\nreport\r\n")
    recorded = q.record(
        "w1",
        now=at,
        outcomes=[
            _outcome(delivered, "delivered", reply="250 2.0.0 Ok: queued as 1", mta="mx1.example.com"),
            _outcome(
                deferred, "deferred", reply="451 4.7.1 greylisted", next_at=retry_at, mta="mx2.example.com"
            ),
            _outcome(bounced, "bounced", reply="550 5.1.1 no such user", mta="mx3.example.com"),
        ],
        bounce=PlannedBounce(message_id=message_id, mail_to=SENDER, build=report),
    )
    assert recorded == 3
    rows = q.rows()

    # (state, attempts, next_attempt_at, last_attempt_at, last_reply, remote_mta), lease cleared.
    expected = {
        delivered: ("delivered", 1, at, at, "250 2.0.0 Ok: queued as 1", "mx1.example.com"),
        deferred: ("deferred", 1, retry_at, at, "451 4.7.1 greylisted", "mx2.example.com"),
        bounced: ("bounced", 1, at, at, "550 5.1.1 no such user", "mx3.example.com"),
    }
    assert {
        rid: (
            row.state,
            row.attempts,
            row.next_attempt_at,
            row.last_attempt_at,
            row.last_reply,
            row.remote_mta,
        )
        for rid, row in rows.items()
        if rid in expected
    } == expected
    assert {(rows[rid].locked_by, rows[rid].locked_until) for rid in expected} == {(None, None)}

    # Exactly one report, built for exactly the recipient that bounced, from the null sender.
    assert report.calls == [[bounced]]
    [bounce] = q.bounces_of(message_id)
    expected_bounce = ("BOUNCEQ1", None, "", message_id)
    assert (bounce.queue_id, bounce.smtp_user_id, bounce.mail_from, bounce.bounce_of) == expected_bounce
    assert (bounce.recipient_count, bounce.size_bytes, bounce.accepted_at) == (1, len(report.data), at)
    content = q.read(
        lambda conn: conn.scalar(
            sa.select(schema.message_contents.c.data).where(schema.message_contents.c.message_id == bounce.id)
        )
    )
    assert content == report.data
    [to_sender] = [row for row in q.rows().values() if row.message_id == bounce.id]
    expected_recipient = (SENDER, "example.org", "queued", 0)
    assert (to_sender.address, to_sender.domain, to_sender.state, to_sender.attempts) == expected_recipient
    assert (to_sender.next_attempt_at, to_sender.locked_by) == (at, None)

    # The report is due at once, and reads back as a bounce with the built bytes.
    claimed = q.claim("w2", now=at, until=at + timedelta(hours=1))
    assert claimed == [ClaimedRecipient(to_sender.id, bounce.id, SENDER, "example.org", 0)]
    loaded = q.read(lambda conn: delivery_queue.load_messages(conn, [bounce.id, message_id]))
    assert loaded[bounce.id].is_bounce and loaded[bounce.id].mail_from == ""
    assert loaded[bounce.id].data == report.data and loaded[bounce.id].queue_id == "BOUNCEQ1"
    assert not loaded[message_id].is_bounce and loaded[message_id].mail_from == SENDER
    assert loaded[message_id].data == DATA and loaded[message_id].accepted_at == T0

    # The deferred recipient comes back when due, with its attempt counted, and is counted again.
    assert q.claim("w3", now=retry_at - timedelta(seconds=1)) == []
    again = q.claim("w3", now=retry_at)
    assert _ids(again) == [deferred] and again[0].attempts == 1
    later = retry_at + timedelta(minutes=15)
    retried = q.record(
        "w3", now=retry_at, outcomes=[_outcome(deferred, "deferred", reply="421 busy", next_at=later)]
    )
    assert retried == 1
    assert (q.rows()[deferred].attempts, q.rows()[deferred].next_attempt_at) == (2, later)


def test_long_replies_and_host_names_are_cut_to_fit(q: Queue) -> None:
    _, [rid] = q.queue("r@example.com", at=T0)
    q.claim("w1", now=T0)
    reply = "550 " + "x" * 1500
    mta = "m" * 300 + ".example.com"
    assert q.record("w1", now=T0, outcomes=[_outcome(rid, "bounced", reply=reply, mta=mta)]) == 1
    row = q.rows()[rid]
    assert (row.last_reply, row.remote_mta) == (reply[:1000], mta[:255])


def test_only_the_lease_holder_records_and_the_bounce_covers_only_what_it_recorded(q: Queue) -> None:
    message_id, [r1, r2, r3] = q.queue("r1@example.com", "r2@example.com", "r3@example.com", at=T0)
    assert len(q.claim("w1", now=T0, until=T0 + timedelta(seconds=30))) == 3
    # w1 keeps r2 and r3 alive; r1's lease runs out and w2 takes it.
    q.write(
        lambda conn: delivery_queue.extend_leases(
            conn, worker="w1", recipient_ids=[r2, r3], until=T0 + timedelta(minutes=10)
        )
    )
    assert _ids(q.claim("w2", now=T0 + timedelta(minutes=1))) == [r1]

    report = _Report()
    at = T0 + timedelta(minutes=2)
    recorded = q.record(
        "w1",
        now=at,
        outcomes=[
            _outcome(r1, "bounced", reply="550 a"),
            _outcome(r2, "bounced", reply="550 b"),
            _outcome(r3, "delivered"),
        ],
        bounce=PlannedBounce(message_id=message_id, mail_to=SENDER, build=report),
    )
    assert recorded == 2
    assert report.calls == [[r2]]
    assert len(q.bounces_of(message_id)) == 1
    rows = q.rows()
    untouched = ("queued", 0, "w2", None)
    assert (rows[r1].state, rows[r1].attempts, rows[r1].locked_by, rows[r1].last_reply) == untouched
    assert (rows[r2].state, rows[r3].state) == ("bounced", "delivered")

    # A record from a worker that holds nothing records nothing, and builds no bounce; nor does a
    # second record of what is already recorded (the lease went with the first).
    no_bounce = PlannedBounce(message_id, SENDER, _never_built)
    assert q.record("w3", now=at, outcomes=[_outcome(r1, "bounced")], bounce=no_bounce) == 0
    assert q.record("w1", now=at, outcomes=[_outcome(r2, "bounced")], bounce=no_bounce) == 0
    assert len(q.bounces_of(message_id)) == 1
    assert q.rows()[r1].state == "queued"


def test_no_bounce_when_nothing_bounced(q: Queue) -> None:
    message_id, [r1, r2] = q.queue("r1@example.com", "r2@example.com", at=T0)
    q.claim("w1", now=T0)
    recorded = q.record(
        "w1",
        now=T0,
        outcomes=[_outcome(r1, "delivered"), _outcome(r2, "deferred", next_at=T0 + timedelta(minutes=1))],
        bounce=PlannedBounce(message_id=message_id, mail_to=SENDER, build=_never_built),
    )
    assert recorded == 2
    assert q.bounces_of(message_id) == []
    assert len(q.rows()) == 2


def test_a_report_that_cannot_be_built_still_records_the_bounce(q: Queue) -> None:
    """``build`` returning None (the worker could not build a report) must not keep the recipient
    from being recorded: unrecorded, it would be attempted again after every lease."""
    message_id, [r1] = q.queue("r1@example.com", at=T0)
    q.claim("w1", now=T0)
    built: list[Collection[int]] = []

    def no_report(ids: Collection[int]) -> None:
        built.append(ids)
        return None

    bounce = PlannedBounce(message_id=message_id, mail_to=SENDER, build=no_report)
    assert q.record("w1", now=T0, outcomes=[_outcome(r1, "bounced")], bounce=bounce) == 1
    assert built == [[r1]]
    assert q.rows()[r1].state == "bounced"
    assert q.bounces_of(message_id) == []


def test_a_bounce_and_its_state_change_are_one_transaction(q: Queue) -> None:
    message_id, [r1, r2] = q.queue("r1@example.com", "r2@example.com", at=T0)
    q.claim("w1", now=T0, until=T0 + LEASE)
    before = q.rows()

    def failing_build(ids: Collection[int]) -> tuple[str, bytes]:
        raise BuildFailed(sorted(ids))

    with pytest.raises(BuildFailed):
        q.record(
            "w1",
            now=T0 + timedelta(seconds=5),
            outcomes=[_outcome(r1, "delivered"), _outcome(r2, "bounced", reply="550 gone")],
            bounce=PlannedBounce(message_id=message_id, mail_to=SENDER, build=failing_build),
        )
    # Neither the states nor a bounce: still w1's, to be recorded again.
    assert q.rows() == before
    assert q.bounces_of(message_id) == []
    assert q.read(lambda conn: conn.scalar(sa.select(sa.func.count()).select_from(schema.messages))) == 1

    report = _Report()
    recorded = q.record(
        "w1",
        now=T0 + timedelta(seconds=6),
        outcomes=[_outcome(r1, "delivered"), _outcome(r2, "bounced", reply="550 gone")],
        bounce=PlannedBounce(message_id=message_id, mail_to=SENDER, build=report),
    )
    assert recorded == 2
    assert report.calls == [[r2]] and len(q.bounces_of(message_id)) == 1


async def _failing_record_beside_others(url: str, r1: int, r2: int, message_id: int) -> list[object]:
    """On SQLite, writes submitted together share one commit: a failing one must still leave nothing."""
    database = Database(url)

    def failing_build(ids: Collection[int]) -> tuple[str, bytes]:
        raise BuildFailed(sorted(ids))

    try:
        return list(
            await asyncio.gather(
                database.write(
                    lambda conn: delivery_queue.record_attempts(
                        conn,
                        worker="w1",
                        records=[
                            AttemptRecord(
                                T0,
                                [_outcome(r1, "bounced")],
                                PlannedBounce(message_id, SENDER, failing_build),
                            )
                        ],
                    )
                ),
                database.write(
                    lambda conn: delivery_queue.record_attempts(
                        conn, worker="w1", records=[AttemptRecord(T0, [_outcome(r2, "delivered")])]
                    )
                ),
                return_exceptions=True,
            )
        )
    finally:
        await database.close()


def test_a_failed_record_leaves_nothing_even_beside_other_writes(q: Queue) -> None:
    message_id, [r1, r2] = q.queue("r1@example.com", "r2@example.com", at=T0)
    q.claim("w1", now=T0)
    first, second = run(_failing_record_beside_others(q.url, r1, r2, message_id))
    assert isinstance(first, BuildFailed) and second == 1
    rows = q.rows()
    states = (rows[r1].state, rows[r1].locked_by, rows[r2].state, rows[r2].locked_by)
    assert states == ("queued", "w1", "delivered", None)
    assert q.bounces_of(message_id) == []


# --- extending and giving back leases ---------------------------------------------------------


def test_extend_leases_extends_only_the_workers_own(q: Queue) -> None:
    _, [r1, r2, r3] = q.queue("r1@example.com", "r2@example.com", "r3@example.com", at=T0)
    assert _ids(q.claim("w1", now=T0, limit=2)) == [r1, r2]
    assert _ids(q.claim("w2", now=T0)) == [r3]
    longer = T0 + timedelta(minutes=10)
    q.write(
        lambda conn: delivery_queue.extend_leases(conn, worker="w1", recipient_ids=[r1, r3], until=longer)
    )
    q.write(lambda conn: delivery_queue.extend_leases(conn, worker="w1", recipient_ids=[], until=longer))
    rows = q.rows()
    assert [(rows[rid].locked_by, rows[rid].locked_until) for rid in (r1, r2, r3)] == [
        ("w1", longer),
        ("w1", T0 + LEASE),
        ("w2", T0 + LEASE),
    ]
    # Past the first lease, r1 is still w1's; r2 (not extended) and r3 (not w1's to extend) are free.
    assert _ids(q.claim("w3", now=T0 + timedelta(minutes=2))) == [r2, r3]


def test_release_leases_gives_back_the_workers_own_only(q: Queue) -> None:
    _, [r1, r2, r3, r4] = q.queue(*(f"r{i}@example.com" for i in range(1, 5)), at=T0)
    assert _ids(q.claim("w1", now=T0, limit=3)) == [r1, r2, r3]
    assert _ids(q.claim("w2", now=T0)) == [r4]

    def release(worker: str, ids: Collection[int] | None = None) -> int:
        return q.write(lambda conn: delivery_queue.release_leases(conn, worker=worker, recipient_ids=ids))

    assert release("w1", []) == 0
    # The given ids only, and only those held by the worker.
    assert release("w1", [r2, r4]) == 1
    rows = q.rows()
    assert [rows[rid].locked_by for rid in (r1, r2, r3, r4)] == ["w1", None, "w1", "w2"]
    assert rows[r2].locked_until is None
    # Released recipients are claimable at once, long before the lease would have run out.
    assert _ids(q.claim("w3", now=T0)) == [r2]
    # All of a worker's (a node starting again), and nobody else's.
    assert release("w1") == 2
    assert release("w1") == 0
    rows = q.rows()
    assert [rows[rid].locked_by for rid in (r1, r2, r3, r4)] == [None, "w3", None, "w2"]
    assert _ids(q.claim("w1", now=T0)) == [r1, r3]
    # Releasing is not an attempt.
    assert {(row.state, row.attempts, row.last_attempt_at) for row in q.rows().values()} == {
        ("queued", 0, None)
    }


# --- usage ------------------------------------------------------------------------------------


def test_delivery_and_bounces_leave_the_usage_counters_alone(q: Queue) -> None:
    message_id, ids = q.queue(*(f"r{i}@example.com" for i in range(4)), at=T0 - timedelta(minutes=1))

    def usage(conn: Connection) -> tuple[Any, ...]:
        user = conn.execute(
            sa.select(schema.smtp_users.c.sent_total, schema.smtp_users.c.last_accepted_at).where(
                schema.smtp_users.c.id == q.user_id
            )
        ).one()
        state = messages.sender_state(conn, smtp_user_id=q.user_id, now=T0 + timedelta(minutes=1))
        assert state is not None
        return user.sent_total, user.last_accepted_at, state.usage

    before = q.read(usage)
    assert before == (4, T0 - timedelta(minutes=1), Usage(sent_total=4, sent_last_hour=4))
    q.claim("w1", now=T0)
    report = _Report()
    recorded = q.record(
        "w1",
        now=T0,
        outcomes=[
            _outcome(ids[0], "delivered"),
            _outcome(ids[1], "bounced"),
            _outcome(ids[2], "bounced"),
            _outcome(ids[3], "deferred", next_at=T0 + timedelta(seconds=30)),
        ],
        bounce=PlannedBounce(message_id, SENDER, report),
    )
    assert recorded == 4 and len(q.bounces_of(message_id)) == 1
    [bounce_recipient] = q.claim("w1", now=T0 + timedelta(seconds=1))
    q.record("w1", now=T0 + timedelta(seconds=1), outcomes=[_outcome(bounce_recipient.id, "delivered")])
    assert q.read(usage) == before
