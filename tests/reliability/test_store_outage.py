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
import os
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
from poweremail.config import Settings
from poweremail.delivery.worker import DeliveryWorker
from poweremail.keyring import Keyring
from poweremail.services import Services
from poweremail.store import delivery_queue, messages, owners, smtp_users
from poweremail.store.database import Database, Work
from poweremail.store.schema import recipients
from tests.delivery.receiver import Receiver

T = TypeVar("T")

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

    async def _run(self, work: Work[T], *, writes: bool) -> T:
        if time.monotonic() < self.away_until:
            raise OSError("connection refused: the store is away")
        result = await super()._run(work, writes=writes)
        if result is self._lost_answer:
            self._lost_answer = _NOTHING
            raise OSError("connection lost before COMMIT was answered")
        return result


def _queue_one_message(conn: Connection, keyring: Keyring) -> None:
    owner = owners.create_owner(conn, name="outage")
    owner_pk = owners.authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
    assert owner_pk is not None
    name, _ = smtp_users.create_smtp_user(
        conn, owner_pk=owner_pk, keyring=keyring, total_limit=10, hourly_limit=10
    )
    user_id = smtp_users.find_smtp_user_id(conn, owner_pk=owner_pk, name=name)
    assert user_id is not None
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
        settings = Settings(
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
