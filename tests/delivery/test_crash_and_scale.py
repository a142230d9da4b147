"""Delivery under a crash and under two nodes at once (SPEC §5), with real processes and real SMTP.

Every test here runs ``poweremail serve`` as child processes that deliver through a ``--relay`` to a
loopback ``Receiver``, and judges them by what arrived there and what the store says:

- a node killed (SIGKILL) mid-delivery and started again under the same ``--node-name`` resumes the
  recipients it had in hand at once (not after its long lease), loses none, alters none, and sends twice
  only recipients that were in flight at the kill;
- two delivery nodes on one PostgreSQL share the queue: each recipient arrives exactly once and both
  nodes do part of the work. The same run with claims made as they would be without ``FOR UPDATE SKIP
  LOCKED`` (loaded into the nodes as ``sitecustomize``) must fail that check: proof that it can;
- a node whose claim filled its room claims again when a job ends, not at its next poll.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.schema import messages, recipients
from tests.delivery.receiver import ReceivedMessage, Receiver
from tests.smtp.helpers import SmtpUser, add_smtp_user, logged_in, queue_id_of, usage
from tests.support import ServerProcess, create_owner, store_read, stored_bodies

SENDER = "app@sender.test"
# What the server puts on top of what it was given (smtp/message.py ``stamp``): its Received header;
# no Message-ID, since every message sent here has one.
_RECEIVED = re.compile(rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*\Z")
# The worker's line per recipient and attempt: "QUEUEID to=<address> delivered (attempt 1) via ...".
_DELIVERED_LINE = re.compile(r" ([0-9A-F]+) to=<([^>]+)> delivered \(attempt \d+\) via ")


@dataclass(frozen=True)
class Sent:
    queue_id: str
    recipients: list[str]
    data: bytes  # as given to DATA (CRLF line ends, before dot-stuffing)


@dataclass(frozen=True)
class RecipientRow:
    address: str
    state: str
    locked_by: str | None


# --- helpers ----------------------------------------------------------------------------------


def _delivery_args(
    relay: Receiver, node: str, *, poll: float, concurrency: int, lease: float = 60
) -> tuple[str, ...]:
    return (
        "--relay", relay.address,
        "--relay-tls", "none",
        "--retry-delays", "0.2,0.5",
        "--node-name", node,
        "--delivery-poll-interval", str(poll),
        # 2 x concurrency recipients are claimed at a time (worker.py _CLAIM_AHEAD).
        "--delivery-concurrency", str(concurrency),
        "--max-connections-per-destination", str(concurrency),
        "--delivery-lease", str(lease),
    )  # fmt: skip


def _tail(server: ServerProcess, lines: int = 30) -> str:
    try:
        text = server.log()
    except OSError as exc:
        return f"(no log: {exc})"
    return f"--- last {lines} lines of {server.log_path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def _wait(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    servers: Iterable[ServerProcess],
    detail: Callable[[], str] = lambda: "",
) -> float:
    """Polls ``predicate`` until it holds; returns the seconds it took. On timeout, or if a server
    exits meanwhile, fails saying what it waited for, ``detail()`` and the servers' logs."""
    start = time.monotonic()
    while not predicate():
        exited = [
            server for server in servers if server.process is not None and server.process.poll() is not None
        ]
        late = time.monotonic() - start > timeout
        if exited or late:
            problem = (
                f"{', '.join(s.log_path.name for s in exited)} exited" if exited else f"{timeout}s passed"
            )
            tails = "\n".join(_tail(server) for server in servers)
            raise AssertionError(f"waiting for {what}: {problem}. {detail()}\n{tails}")
        time.sleep(0.1)
    return time.monotonic() - start


def _body(number: int, tag: str) -> bytes:
    """A message of a few KiB whose bytes are all its own: dots to stuff, an 8-bit line, long lines."""
    lines = [
        f"From: App <{SENDER}>",
        "To: undisclosed-recipients:;",
        f"Subject: {tag} message {number}",
        f"Message-ID: <{tag}.{number}.{secrets.token_hex(4)}@sender.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        ".a line that starts with a dot",
        "..two dots",
        ".",
        "caf\u00e9 \u2014 8-bit text",
    ]
    lines += [f"{number:04d}/{i:03d} " + secrets.token_hex(40) for i in range(60)]
    lines.append("end")
    return ("\r\n".join(lines) + "\r\n").encode()


def _send(server: ServerProcess, user: SmtpUser, batches: list[list[str]], tag: str) -> list[Sent]:
    """One SMTP session; one message per batch of recipients. Returns what was queued, in order."""
    sent: list[Sent] = []
    with logged_in(server, user) as client:
        for number, batch in enumerate(batches):
            data = _body(number, tag)
            code, reply = client.mail(SENDER)
            assert code == 250, reply
            for address in batch:
                code, reply = client.rcpt(address)
                assert code == 250, (address, reply)
            code, reply = client.data(data)
            assert code == 250, reply
            sent.append(Sent(queue_id_of(reply), batch, data))
    return sent


def _recipient_rows(database_url: str) -> dict[str, RecipientRow]:
    def read(conn: Connection) -> dict[str, RecipientRow]:
        rows = conn.execute(sa.select(recipients.c.address, recipients.c.state, recipients.c.locked_by))
        return {row.address: RecipientRow(row.address, row.state, row.locked_by) for row in rows}

    return store_read(database_url, read)


def _states(database_url: str) -> Counter[str]:
    def read(conn: Connection) -> Counter[str]:
        rows = conn.execute(sa.select(recipients.c.state, sa.func.count()).group_by(recipients.c.state))
        return Counter({row[0]: int(row[1]) for row in rows})

    return store_read(database_url, read)


def _stored_data(database_url: str) -> dict[str, bytes]:
    def read(conn: Connection) -> dict[str, bytes]:
        rows = conn.execute(sa.select(messages.c.id, messages.c.queue_id)).all()
        bodies = stored_bodies(conn, [row.id for row in rows])
        return {row.queue_id: bodies[row.id] for row in rows}

    return store_read(database_url, read)


def _check_intact(sent: list[Sent], stored: dict[str, bytes], arrived: list[ReceivedMessage]) -> None:
    """Every arrival is one queued message in full, byte for byte, to recipients of that message."""
    assert set(stored) == {s.queue_id for s in sent}, "the store holds other messages than those sent"
    by_bytes: dict[bytes, Sent] = {}
    for message in sent:
        data = stored[message.queue_id]
        assert data.endswith(message.data), f"{message.queue_id}: stored bytes differ from those sent"
        added = data[: len(data) - len(message.data)]
        assert _RECEIVED.match(added), f"{message.queue_id}: unexpected bytes added on top: {added!r}"
        by_bytes[data] = message
    for arrival in arrived:
        origin = by_bytes.get(arrival.data)
        assert origin is not None, (
            f"an arrival (connection {arrival.connection_id}, to {arrival.rcpt_tos}) is no queued message "
            f"in full: {len(arrival.data)} bytes starting {arrival.data[:200]!r}"
        )
        assert arrival.mail_from == SENDER
        assert set(arrival.rcpt_tos) <= set(origin.recipients), (origin.queue_id, arrival.rcpt_tos)


def _arrivals(arrived: list[ReceivedMessage]) -> Counter[str]:
    return Counter(address for message in arrived for address in message.rcpt_tos)


def _delivered_in_log(server: ServerProcess) -> Counter[str]:
    """Recipients this node's log says it delivered (one count per line)."""
    return Counter(match.group(2) for match in _DELIVERED_LINE.finditer(server.log()))


def _check_exactly_once(
    expected: set[str], arrived: list[ReceivedMessage], workers: list[ServerProcess]
) -> dict[str, int]:
    """Each recipient arrived exactly once, and the workers' logs agree (each delivered by one worker,
    once). Returns how many each worker delivered, by log file name."""
    arrivals = _arrivals(arrived)
    twice = sorted(address for address, n in arrivals.items() if n > 1)
    assert not twice, f"{len(twice)} recipient(s) arrived more than once, e.g. {twice[:10]}"
    missing, unexpected = sorted(expected - set(arrivals)), sorted(set(arrivals) - expected)
    assert not missing and not unexpected, f"missing: {missing[:10]}, unexpected: {unexpected[:10]}"
    per_worker = {worker.log_path.name: _delivered_in_log(worker) for worker in workers}
    by_all: Counter[str] = sum(per_worker.values(), Counter())
    claimed_twice = sorted(address for address, n in by_all.items() if n > 1)
    assert not claimed_twice, (
        f"{len(claimed_twice)} recipient(s) delivered by two workers, e.g. {claimed_twice[:10]}"
    )
    assert set(by_all) == expected, "the workers' logs do not account for every delivery"
    return {name: sum(counts.values()) for name, counts in per_worker.items()}


def _stopped(server: ServerProcess) -> int:
    """Stops ``server`` if it runs; its exit code (0 if it never started)."""
    if server.process is None:
        return 0
    if server.process.poll() is not None:
        return server.process.returncode
    return server.stop()


def _queue_on_a_submission_node(
    database_url: str, tmp_path: Path, batches: list[list[str]], tag: str
) -> list[Sent]:
    """Queues ``batches`` through the SMTP server of a node that does not deliver, then stops it."""
    total = sum(len(batch) for batch in batches)
    node = ServerProcess(tmp_path / "data", database_url, tmp_path / "submission.log", roles="api,smtp")
    try:
        node.start()
        owner = create_owner(database_url)
        user = add_smtp_user(node, owner, total_limit=10_000, hourly_limit=10_000)
        sent = _send(node, user, batches, tag)
        assert usage(node, owner, user)[0] == total
    finally:
        code = _stopped(node)
    assert code == 0, _tail(node)
    assert _states(database_url) == Counter(queued=total)
    return sent


def _delivery_nodes(
    tmp_path: Path, database_url: str, args_by_node: dict[str, tuple[str, ...]]
) -> list[ServerProcess]:
    """Delivery-only nodes (not started), logging to NAME.log."""
    return [
        ServerProcess(
            tmp_path / "data", database_url, tmp_path / f"{name}.log", roles="delivery", extra_args=args
        )
        for name, args in args_by_node.items()
    ]


def _start_side_by_side(nodes: list[ServerProcess]) -> None:
    """Starts the nodes one right after the other; returns once each has said it delivers."""
    for node in nodes:
        node.start()  # returns at once: ServerProcess waits only for API and SMTP ports, and these have none
    _wait(
        lambda: all("delivery through the relay" in node.log() for node in nodes),
        timeout=30,
        what="delivery nodes started",
        servers=nodes,
    )


# --- a node killed mid-delivery ---------------------------------------------------------------

CRASH_MESSAGES = 24
CRASH_RECIPIENTS_PER_MESSAGE = 3
CRASH_LEASE = 120.0  # far longer than the test may take: only "resumes its own at once" can pass it
CRASH_DATA_DELAY = 0.2  # the receiver's answer to DATA is slow: deliveries stay in flight a while


def _slow_data(_n: int) -> str | None:
    time.sleep(CRASH_DATA_DELAY)  # on the receiver's thread: one transaction at a time
    return None


def test_a_killed_node_resumes_its_own_deliveries_at_once_and_sends_twice_only_what_was_in_flight(
    database_url: str, tmp_path: Path
) -> None:
    total = CRASH_MESSAGES * CRASH_RECIPIENTS_PER_MESSAGE
    batches = [
        [f"r{m:02d}-{i}@dest{i}.test" for i in range(CRASH_RECIPIENTS_PER_MESSAGE)]
        for m in range(CRASH_MESSAGES)
    ]
    node = f"crash-node-{secrets.token_hex(3)}"
    with Receiver(data=_slow_data) as relay:
        # Two transactions at once, so few recipients (4) are leased at once: "in flight" is a small set.
        args = _delivery_args(relay, node, poll=0.01, concurrency=2, lease=CRASH_LEASE)
        first, second = (
            ServerProcess(
                tmp_path / "data", database_url, tmp_path / log, roles="api,smtp,delivery", extra_args=args
            )
            for log in ("before-kill.log", "after-restart.log")
        )
        try:
            first.start()
            owner = create_owner(database_url)
            user = add_smtp_user(first, owner, total_limit=10_000, hourly_limit=10_000)
            sent = _send(first, user, batches, "crash")
            _wait(
                lambda: sum(len(m.rcpt_tos) for m in relay.messages) >= total // 3,
                timeout=30,
                what=f"{total // 3} recipients delivered before the kill",
                servers=[first],
                detail=lambda: f"Arrived: {sum(len(m.rcpt_tos) for m in relay.messages)}.",
            )
        finally:
            if first.process is not None:
                first.kill()
        arrived_by_kill = sum(len(m.rcpt_tos) for m in relay.messages)

        at_kill = _recipient_rows(database_url)
        assert len(at_kill) == total
        delivered_at_kill = {a for a, row in at_kill.items() if row.state == "delivered"}
        in_flight = {a for a, row in at_kill.items() if row.state in ("queued", "deferred") and row.locked_by}
        assert {row.locked_by for row in at_kill.values()} <= {None, node}
        assert 0 < len(delivered_at_kill) < total, "the kill was to fall in the middle of the work"
        assert in_flight, "nothing was leased at the kill: the test missed the crash it is about"

        try:
            second.start()
            drain = _wait(
                lambda: _states(database_url) == Counter(delivered=total),
                # Well under CRASH_LEASE: the leases the kill left must be released at the start, not expire.
                timeout=45,
                what=f"all {total} recipients delivered after the restart ({len(in_flight)} were leased to "
                f"{node!r} until up to {CRASH_LEASE:.0f}s after the kill)",
                servers=[second],
                detail=lambda: f"Recipients by state: {dict(_states(database_url))}.",
            )
            assert f"resuming {len(in_flight)} recipient(s) this node had in hand" in second.log(), _tail(
                second
            )
            assert usage(second, owner, user)[0] == total
        finally:
            code = _stopped(second)
        assert code == 0, _tail(second)
        arrived = relay.messages

    _check_intact(sent, _stored_data(database_url), arrived)
    arrivals = _arrivals(arrived)
    assert set(arrivals) == set(at_kill), f"never arrived: {sorted(set(at_kill) - set(arrivals))}"
    twice = {address for address, n in arrivals.items() if n > 1}
    assert twice <= in_flight, f"sent twice though not in flight at the kill: {sorted(twice - in_flight)}"
    assert max(arrivals.values()) <= 2, arrivals.most_common(3)
    print(
        f"\ncrash ({database_url.split(':')[0]}): {total} recipients; at the kill "
        f"{len(delivered_at_kill)} recorded delivered, {arrived_by_kill} arrived, {len(in_flight)} in flight;"
        f" sent twice {len(twice)}; drained {drain:.1f}s after the restart"
    )


# --- two delivery nodes on one PostgreSQL -----------------------------------------------------

SCALE_MESSAGES = 20
SCALE_RECIPIENTS_PER_MESSAGE = 100

# The claim as it would be without FOR UPDATE SKIP LOCKED (leases still honoured): two nodes that
# claim at the same instant both pick the same rows; the one that waits on the other's row lock then
# overwrites its claim (PostgreSQL re-checks only "id IN (...)" on the updated row). Loaded into the
# delivery nodes as ``sitecustomize`` by the test that shows the exactly-once check catches it.
_CLAIM_WITHOUT_SKIP_LOCKED = """
import sys

import sqlalchemy as sa

from poweremail.store import delivery_queue
from poweremail.store.schema import recipients

_due = (
    sa.select(recipients.c.id)
    .where(
        delivery_queue._PENDING,
        recipients.c.next_attempt_at <= sa.bindparam("now"),
        sa.or_(recipients.c.locked_until.is_(None), recipients.c.locked_until < sa.bindparam("now")),
        # 20 ms between the statement's snapshot and its choice of rows: what the other node claims
        # meanwhile is taken again. Without it the collisions depend on timing, and a fast run could
        # have none (seen once in eight runs after delivery's client began pipelining).
        sa.text("(SELECT true FROM pg_sleep(0.02))"),
    )
    .order_by(recipients.c.next_attempt_at)
    .limit(sa.bindparam("limit"))
)
delivery_queue._CLAIM = (
    recipients.update()
    .where(recipients.c.id.in_(_due.scalar_subquery()))
    .values(locked_by=sa.bindparam("worker"), locked_until=sa.bindparam("until"))
    .returning(*(recipients.c[name] for name in ("id", "message_id", "address", "domain", "attempts")))
)
print("MUTANT: claims without FOR UPDATE SKIP LOCKED", file=sys.stderr, flush=True)
"""


@dataclass(frozen=True)
class TwoNodesRun:
    expected: set[str]
    arrived: list[ReceivedMessage]
    workers: list[ServerProcess]
    drain: float


def _two_nodes_deliver(database_url: str, tmp_path: Path) -> TwoNodesRun:
    """20 messages x 100 recipients queued by a node that does not deliver; then two delivery nodes
    on the same database and one relay, until the store says every recipient is delivered."""
    batches = [
        [f"r{m:02d}-{i:03d}@dest{i % 7}.test" for i in range(SCALE_RECIPIENTS_PER_MESSAGE)]
        for m in range(SCALE_MESSAGES)
    ]
    total = SCALE_MESSAGES * SCALE_RECIPIENTS_PER_MESSAGE
    # The relay holds every transaction at MAIL until both nodes run: a node that started a moment
    # sooner must not drain the queue alone (the whole run takes about two seconds).
    both_running = threading.Event()

    def hold_until_both_run(_sender: str, _n: int) -> str | None:
        if not both_running.wait(timeout=40):
            return "421 4.3.0 the test never opened the gate"
        return None

    with Receiver(mail=hold_until_both_run) as relay:
        sent = _queue_on_a_submission_node(database_url, tmp_path, batches, "scale")
        # Small claims (10 recipients) and a short poll: each node claims dozens of times a second, side
        # by side with the other, so claims that were not exclusive would overlap many times over. (The
        # short poll also spares the nodes the wait after each claim that the last test here is about.)
        workers = _delivery_nodes(
            tmp_path,
            database_url,
            {
                name: _delivery_args(relay, name, poll=0.01, concurrency=5)
                for name in ("worker-a", "worker-b")
            },
        )
        try:
            _start_side_by_side(workers)
            both_running.set()
            drain = _wait(
                lambda: _states(database_url) == Counter(delivered=total),
                timeout=60,
                what=f"all {total} recipients delivered",
                servers=workers,
                detail=lambda: f"Recipients by state: {dict(_states(database_url))}.",
            )
        finally:
            codes = [_stopped(worker) for worker in workers]
        assert codes == [0, 0], "\n".join(_tail(worker) for worker in workers)
        arrived = relay.messages
    _check_intact(sent, _stored_data(database_url), arrived)
    return TwoNodesRun({a for batch in batches for a in batch}, arrived, workers, drain)


# Two nodes share a queue only through PostgreSQL (SPEC §1): SQLite is one file on one machine.
@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_delivery_nodes_on_one_postgresql_deliver_each_recipient_exactly_once(
    database_url: str, tmp_path: Path
) -> None:
    run = _two_nodes_deliver(database_url, tmp_path)
    split = _check_exactly_once(run.expected, run.arrived, run.workers)
    assert all(n > 0 for n in split.values()), f"one node did all the work: {split}"
    print(
        f"\nscale: {len(run.expected)} recipients in {len(run.arrived)} transactions, drained in "
        f"{run.drain:.1f}s, split {split}"
    )


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_exactly_once_check_catches_claims_that_do_not_skip_locked_rows(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run above, with both nodes claiming as the queue would without FOR UPDATE SKIP LOCKED: the
    same check must fail. It shows that the scenario makes claims collide and that the check sees it."""
    mutant = tmp_path / "mutant"
    mutant.mkdir()
    (mutant / "sitecustomize.py").write_text(_CLAIM_WITHOUT_SKIP_LOCKED)
    # Into the child processes' environment (tests.support.clean_env), ahead of any path already there.
    paths = [str(mutant), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    run = _two_nodes_deliver(database_url, tmp_path)
    for worker in run.workers:
        assert "MUTANT: claims without FOR UPDATE SKIP LOCKED" in worker.log(), _tail(worker)
    with pytest.raises(AssertionError, match=r"recipient\(s\) arrived more than once") as caught:
        _check_exactly_once(run.expected, run.arrived, run.workers)
    print(f"\nmutant: {str(caught.value).splitlines()[0]}")


# --- claiming again as soon as there is room --------------------------------------------------


def test_a_delivery_node_claims_again_when_its_claim_is_done_not_at_its_next_poll(
    database_url: str, tmp_path: Path
) -> None:
    """A node that has mail due and free slots claims it at once. ``--delivery-poll-interval`` is how
    often a node looks for mail *other* nodes queued (config.py); a node whose whole claim was one job
    (here 10 recipients = 2 x concurrency 5 = one message through the relay) must not then sit out that
    interval with its slots idle: 10 such messages would take 10 intervals instead of a moment."""
    batches = [[f"r{m:02d}-{i}@dest.test" for i in range(10)] for m in range(10)]
    total = sum(len(batch) for batch in batches)
    with Receiver() as relay:
        _queue_on_a_submission_node(database_url, tmp_path, batches, "room")
        nodes = _delivery_nodes(
            tmp_path, database_url, {"room": _delivery_args(relay, "room", poll=30, concurrency=5)}
        )
        try:
            _start_side_by_side(nodes)
            _wait(
                lambda: _states(database_url) == Counter(delivered=total),
                timeout=15,
                what=f"all {total} recipients delivered by a node polling every 30s",
                servers=nodes,
                detail=lambda: (
                    f"Recipients by state: {dict(_states(database_url))}; arrived at the relay: "
                    f"{sum(len(m.rcpt_tos) for m in relay.messages)}."
                    " A claim of one message seems to be followed by a wait for the poll interval."
                ),
            )
        finally:
            codes = [_stopped(node) for node in nodes]
        assert codes == [0] * len(nodes)
