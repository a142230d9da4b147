"""The store goes away (issue 6, item 3): PostgreSQL restarts under load, or SQLite's disk is full or
fails. SMTP answers 451 4.3.0 and never 250 for what was not stored, the API answers GeneralError, and
both recover on their own when the store is back; so does the delivery worker.

How the store goes away (``tests.reliability.store_faults``): PostgreSQL through a TCP proxy of the
test's own that cuts every connection and refuses new ones, as a restarting server does; SQLite by
making every write of the node's process fail (its file-size limit set to 0 from outside), as a full
or failing disk does. A longer run with several outages: ``reliability/store_outage.py``.

Figures are printed (``pytest -s``) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import socketserver
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

import poweremail.delivery.worker as worker_module
from poweremail.config import load_settings
from poweremail.delivery.worker import DeliveryWorker
from poweremail.errors import GeneralError
from poweremail.keyring import Keyring
from poweremail.services import Services
from poweremail.smtp import replies
from poweremail.store import delivery_queue, messages
from poweremail.store.database import Database, Work
from poweremail.store.schema import recipients
from tests.delivery.receiver import Receiver
from tests.reliability.outage import (
    delivery_figures,
    ledger_figures,
    outage_figures,
    run_outages,
    start_outage_node,
)
from tests.reliability.outage_load import LARGE_BODY, SteadyLoad
from tests.reliability.proxy import TcpProxy
from tests.reliability.store_faults import store_fault
from tests.smtp.helpers import add_smtp_user
from tests.smtp.letters import Outcome, assert_queued_as_acknowledged, assert_whole, queued_messages
from tests.support import create_owner, new_owner_with_user

T = TypeVar("T")

# --- under load: SMTP sessions, new logins, API calls and the delivery worker ----------------------

OUTAGE = 3.0  # seconds the store is away
AFTERWARDS = 5.0  # seconds of load after it is back: everything must have recovered within them
SENDERS = 4
LIMIT = 1_000_000
# What a client gets while the store is away, per stage. PostgreSQL: nothing can be read or written.
# SQLite with a full disk: reads work (logins, MAIL, listSmtp); only storing fails.
DURING = {
    "postgresql": {
        "AUTH": replies.AUTH_TEMPORARY_FAILURE,
        "LOGIN": replies.AUTH_TEMPORARY_FAILURE,
        # MAIL reads the store unless the sender's state is under SENDER_STATE_MAX_AGE old (its last
        # batch refreshed it): in the outage's first half second MAIL may pass; DATA then says 451.
        "MAIL": (replies.STORE_UNAVAILABLE, replies.SENDER_OK),
        "DATA": replies.STORE_UNAVAILABLE,
        "listSmtp": 500,
        "editSmtp": 500,
    },
    "sqlite": {
        "AUTH": replies.AUTH_SUCCESS,
        "LOGIN": replies.AUTH_SUCCESS,
        "MAIL": replies.SENDER_OK,
        "DATA": replies.STORE_UNAVAILABLE,
        "listSmtp": 200,
        "editSmtp": 500,
    },
}
GENERAL_ERROR = {
    "status": "error",
    "code": "-1",
    "name": "GeneralError",
    "type": "GeneralError",
    "message": GeneralError().message,
}


def test_the_store_goes_away_under_load_and_everything_recovers_on_its_own(
    backend: str, database_url: str, tmp_path: Path
) -> None:
    """A node with every role, under four SMTP senders (one of them sending 3 MB letters), a new login
    every 0.2 s and an API client, loses its store for 3 s. Meanwhile no message gets a 250, SMTP
    answers 451 4.3.0 (and 454 4.7.0 to logins it cannot check), the API answers GeneralError to what
    needs the store. Within 5 s of the store's return every sender, new logins, API reads and writes
    succeed again, and keep succeeding; every 250-ed message is stored once and counted, and the
    delivery worker delivers all of it, once. No restart of the node."""
    fault = store_fault(database_url)
    try:
        with Receiver() as relay:
            node = start_outage_node(tmp_path, fault, relay)
            try:
                fault.attach(node)
                owner = create_owner(database_url)
                user = add_smtp_user(node, owner, total_limit=LIMIT, hourly_limit=LIMIT)
                load = SteadyLoad(
                    node, owner, user, senders=SENDERS, total_limit=LIMIT, first_sender_body=LARGE_BODY
                )
                [window], stopped = run_outages(
                    load, fault, outages=1, seconds=OUTAGE, between=AFTERWARDS, warmup=1.5
                )
                outage = outage_figures(load, window, horizon=stopped)
                delivery = delivery_figures(load, database_url, relay, since=stopped, bound=20)
                ledger = ledger_figures(load, database_url)
            finally:
                node.stop()
    finally:
        fault.close()
    print(f"\n{backend}: {outage.summary()}\n{backend}: {ledger.summary()}\n{backend}: {delivery.summary()}")

    # While the store was away: never a 250 for a message, and the documented temporary answers.
    assert outage.acknowledged_during == []
    expected = DURING[backend]
    for what, count in outage.smtp_during.items():
        stage, reply = what.split(" ", 1)
        if stage in expected:
            allowed = expected[stage]
            assert reply in (allowed if isinstance(allowed, tuple) else (allowed,)), (what, count)
    for what in outage.api_during:
        call, status = what.split(" ", 2)[:2]
        assert int(status) == expected[call], what
    general_errors = [
        c.body for c in load.api() if window.holds(c.asked_at, c.answered_at) and c.status == 500
    ]
    assert general_errors and all(body == GENERAL_ERROR for body in general_errors)
    felt = "MAIL" if backend == "postgresql" else "DATA"
    assert outage.smtp_during[f"{felt} {replies.STORE_UNAVAILABLE}"] > 0, outage.smtp_during

    # Back on its own: every sender, new logins, API reads and writes, within AFTERWARDS; then no relapse.
    assert outage.recovered is not None, outage.summary()
    assert outage.relapses == []

    # Every 250 is stored, once, whole and counted; nothing else is, but what was in flight at the cut.
    stored = queued_messages(database_url, user)
    acknowledged = [Outcome(r.letter, "DATA", r.reply) for r in load.acknowledged() if r.letter is not None]
    assert_queued_as_acknowledged(stored, acknowledged)
    assert_whole(stored)
    assert ledger.lost == 0
    assert ledger.stored_twice == 0
    if backend == "sqlite":
        assert ledger.stored_without_250 == 0
    else:  # COMMIT done, its answer cut off on the way back: the node answered 451 (a duplicate if resent)
        assert ledger.stored_without_250 <= SENDERS
    assert ledger.sent_total == ledger.stored_recipients

    # And the delivery worker delivered every one of them, once.
    assert delivery.drained is not None, delivery.summary()
    assert delivery.relayed_twice == 0
    assert delivery.relayed == delivery.recipients == ledger.stored_recipients


# --- the harness: the proxy plays a server restarting ----------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def test_the_proxy_cuts_every_connection_refuses_new_ones_and_comes_back_on_the_same_port() -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with TcpProxy("127.0.0.1", server.server_address[1]) as proxy:
                port = proxy.port
                with socket.create_connection(("127.0.0.1", port), timeout=5) as before:
                    before.sendall(b"ping")
                    assert before.recv(4) == b"ping"
                    assert proxy.down() == 1
                    with contextlib.suppress(ConnectionResetError):  # cut: closed or reset
                        assert before.recv(4) == b""
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", port), timeout=5)
                proxy.up()
                assert proxy.port == port
                with socket.create_connection(("127.0.0.1", port), timeout=5) as after:
                    after.sendall(b"pong")
                    assert after.recv(4) == b"pong"
        finally:
            server.shutdown()


# --- SQLite: a transaction the disk made SQLite roll back whole ------------------------------------


def test_a_batch_sqlite_rolls_back_whole_tells_no_job_it_was_stored(tmp_path: Path) -> None:
    """SQLite writes in batches: one transaction, a savepoint per job (group commit). When the disk
    fills in the middle of a job, SQLite may roll back the whole transaction, not just that job's
    statement; the jobs before it are then gone as well. None of them may be told it was stored (that
    is an SMTP 250 for a message that is not there). Here the disk "fills" through max_page_count,
    which gives the same SQLITE_FULL; the large job spills out of the page cache mid-statement."""

    async def scenario() -> tuple[list[object], list[str]]:
        database = Database(f"sqlite:///{tmp_path / 'store.sqlite3'}")
        try:
            await database.migrate()
            await database.write(
                lambda conn: conn.exec_driver_sql("CREATE TABLE scratch (what TEXT, data BLOB)")
            )
            pages = await database.read(lambda conn: conn.exec_driver_sql("PRAGMA page_count").scalar_one())

            def insert(what: str, size: int, room: int) -> asyncio.Future[object]:
                def work(conn: Connection) -> object:
                    conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + room}")  # per connection
                    conn.exec_driver_sql("INSERT INTO scratch VALUES (?, ?)", (what, b"x" * size))
                    return what

                return asyncio.ensure_future(database.write(work))

            # Hold the writer thread so that the three jobs queue up and run as one batch.
            holding, release = threading.Event(), threading.Event()

            def hold(conn: Connection) -> None:
                holding.set()
                release.wait(10)

            held = asyncio.ensure_future(database.write(hold))
            assert await asyncio.to_thread(holding.wait, 10)
            jobs = [insert("before", 100, 50), insert("large", 1_000_000, 50), insert("after", 100, 50)]
            await asyncio.sleep(0.05)  # queued behind the held batch
            release.set()
            await held
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)

            # Room again: the writer goes on as before.
            assert await insert("later", 100, 1_000_000) == "later"
            stored = await database.read(
                lambda conn: list(conn.exec_driver_sql("SELECT what FROM scratch ORDER BY rowid").scalars())
            )
            return outcomes, stored
        finally:
            await database.close()

    outcomes, stored = asyncio.run(scenario())
    assert stored == ["later"]
    for outcome in outcomes:  # not "before": it was rolled back with the rest
        assert isinstance(outcome, SQLAlchemyError), outcomes
    assert "database or disk is full" in str(outcomes[0])


# --- the delivery worker: nothing sits out a lease, nothing is sent twice ---------------------------

STORE_AWAY = 2.0  # seconds
WorkerFailure = Literal["the message cannot be read", "the claim's answer is lost"]
_NOTHING = object()


class _FlakyStore(Database):
    """The node's store, away (every call fails, as when PostgreSQL refuses connections) for
    ``STORE_AWAY`` seconds from the moment ``go_away`` is called (from inside a transaction: that
    one still commits; with ``lose_answer=result`` its caller gets an error all the same, as when the
    connection dies between COMMIT and its answer)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.away_until = 0.0
        self.went_away = False
        self._lost_answer: object = _NOTHING

    def go_away(self, *, lose_answer: object = _NOTHING) -> None:
        self.went_away = True
        self.away_until = time.monotonic() + STORE_AWAY
        self._lost_answer = lose_answer

    async def _run(self, work: Work[T], *, writes: bool, alone: bool = False) -> T:
        if time.monotonic() < self.away_until:
            raise OSError("connection refused: the store is away")
        result = await super()._run(work, writes=writes, alone=alone)
        if result is self._lost_answer:
            self._lost_answer = _NOTHING
            raise OSError("connection lost before COMMIT was answered")
        return result


def _queue_one_message(conn: Connection, keyring: Keyring) -> None:
    _, user_id, _ = new_owner_with_user(conn, keyring, total_limit=10, hourly_limit=10, name="outage")
    queued = messages.queue_message(
        conn, smtp_user_id=user_id, credential_version=1, queue_id="OUTAGE0000000001",
        mail_from="app@sender.test", rcpt_tos=["ann@example.test"],
        data=b"Subject: outage\r\n\r\nbody\r\n", now=datetime.now(UTC),
    )  # fmt: skip
    assert isinstance(queued, messages.Queued)


def _recipient_rows(conn: Connection) -> list[tuple[str, str | None]]:
    return [
        (row.state, row.locked_by)
        for row in conn.execute(sa.select(recipients.c.state, recipients.c.locked_by))
    ]


def _deliver_one_message(
    store: _FlakyStore, tmp_path: Path, relay: Receiver, monkeypatch: pytest.MonkeyPatch, *, lease: float = 60
) -> float:
    """A delivery worker (in this process) on ``store`` delivers one message through ``relay``; returns
    the seconds until its outcome was recorded, after which it runs on for a second (a recipient
    attempted again would show)."""
    for name in [name for name in os.environ if name.startswith("POWEREMAIL_")]:
        monkeypatch.delenv(name)

    async def deliver() -> float:
        keyring = Keyring.load_or_create(tmp_path / "secret.key")
        settings = load_settings(
            data_dir=tmp_path, relay=relay.address, relay_tls="none", node_name="outage",
            retry_delays=(0.2,), delivery_poll_interval=0.1, delivery_lease=lease,
        )  # fmt: skip
        observer = Database(store.url)  # reads the outcome, whether the worker's store is away or not
        try:
            await store.migrate()
            await store.write(lambda conn: _queue_one_message(conn, keyring))
            stop = asyncio.Event()
            worker = asyncio.create_task(DeliveryWorker(Services(settings, store, keyring)).run(stop))
            started = time.monotonic()
            try:
                while await observer.read(_recipient_rows) != [("delivered", None)]:
                    assert time.monotonic() - started < 15, await observer.read(_recipient_rows)
                    await asyncio.sleep(0.05)
                took = time.monotonic() - started
                await asyncio.sleep(1)
                return took
            finally:
                stop.set()
                await worker
        finally:
            await observer.close()
            await store.close()

    return asyncio.run(deliver())


@pytest.mark.parametrize("failure", ["the message cannot be read", "the claim's answer is lost"])
def test_the_delivery_worker_gives_back_its_leases_when_the_store_returns(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: WorkerFailure
) -> None:
    """The store goes away just after the worker claimed a recipient: the worker cannot read the
    message nor give the lease back, or it never learns that its claim committed. Either way, once
    the store answers again the worker gives that lease back and delivers at once, rather than
    leaving the recipient leased to itself, untouched, for the whole lease (60 s by default)."""
    store = _FlakyStore(database_url)
    original_claim = delivery_queue.claim_due

    def claim_then_go_away(conn: Connection, **kwargs: Any) -> list[delivery_queue.ClaimedRecipient]:
        claimed = original_claim(conn, **kwargs)
        if claimed and not store.went_away:
            store.go_away(lose_answer=claimed if failure == "the claim's answer is lost" else _NOTHING)
        return claimed

    monkeypatch.setattr(delivery_queue, "claim_due", claim_then_go_away)
    with Receiver() as relay:
        took = _deliver_one_message(store, tmp_path, relay, monkeypatch)
        assert len(relay.messages) == 1
    assert store.went_away
    assert took < STORE_AWAY + 3, took  # not the 60 s lease
    print(f"\n{failure}: delivered and recorded {took:.1f} s after the claim (store away {STORE_AWAY} s)")


def test_an_outcome_is_recorded_when_the_store_returns_and_not_sent_again(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store goes away while a message is being delivered, for longer than the worker's first
    retries to record the outcome, and longer than the lease: the worker goes on trying until the
    store answers (the relay's 250 is not forgotten), and it does not claim and send the recipient
    again meanwhile, though its lease lapsed."""
    store = _FlakyStore(database_url)
    monkeypatch.setattr(worker_module, "_RECORD_RETRY_DELAYS", (0.1, 0.2))  # 0.3 s in all, then 0.2 s apart

    def accept_then_go_away(n: int) -> None:
        if not store.went_away:
            store.go_away()
        return None

    with Receiver(data=accept_then_go_away) as relay:
        took = _deliver_one_message(store, tmp_path, relay, monkeypatch, lease=1.0)
        assert len(relay.messages) == 1, relay.messages
    assert store.went_away
    assert took < STORE_AWAY + 3, took
    print(f"\nrecorded {took:.1f} s after the claim (store away {STORE_AWAY} s, lease 1 s); sent once")
