"""The store goes away (issue 6, item 3): PostgreSQL restarts under load, or SQLite's disk is full or
fails. SMTP answers 451 4.3.0 and never 250 for what was not stored, the API answers GeneralError, and
both recover on their own when the store is back.

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


# --- the delivery worker: no lease sat out after the store was away --------------------------------

STORE_AWAY = 1.0  # seconds
WorkerFailure = Literal["the message cannot be read", "the claim's answer is lost"]
_NOTHING = object()


class _FlakyStore(Database):
    """The node's store, away (every call fails, as when PostgreSQL refuses connections) for
    ``STORE_AWAY`` seconds from the moment ``away_after`` is called inside a transaction; that
    transaction itself commits, and with ``lose_answer`` its caller gets an error all the same (the
    connection died between COMMIT and its answer)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.away_until = 0.0
        self.went_away = False
        self._lost_answer: object = _NOTHING

    def away_after(self, result: object, *, lose_answer: bool) -> None:
        self.went_away = True
        self.away_until = time.monotonic() + STORE_AWAY
        if lose_answer:
            self._lost_answer = result

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


@pytest.mark.parametrize("failure", ["the message cannot be read", "the claim's answer is lost"])
def test_the_delivery_worker_gives_back_its_leases_when_the_store_returns(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: WorkerFailure
) -> None:
    """The store goes away just after the worker claimed a recipient: the worker cannot read the
    message nor give the lease back, or it never learns that its claim committed. Either way, once
    the store answers again the worker gives that lease back and delivers at once, rather than
    leaving the recipient leased to itself, untouched, for the whole lease (60 s by default)."""
    for name in [name for name in os.environ if name.startswith("POWEREMAIL_")]:
        monkeypatch.delenv(name)
    store = _FlakyStore(database_url)
    original_claim = delivery_queue.claim_due

    def claim_then_go_away(conn: Connection, **kwargs: Any) -> list[delivery_queue.ClaimedRecipient]:
        claimed = original_claim(conn, **kwargs)
        if claimed and not store.went_away:
            store.away_after(claimed, lose_answer=failure == "the claim's answer is lost")
        return claimed

    monkeypatch.setattr(delivery_queue, "claim_due", claim_then_go_away)

    async def deliver(relay: Receiver) -> float:
        keyring = Keyring.load_or_create(tmp_path / "secret.key")
        settings = Settings(
            data_dir=tmp_path, relay=relay.address, relay_tls="none", node_name="outage",
            retry_delays=(0.2,), delivery_poll_interval=0.1,
        )  # fmt: skip
        try:
            await store.migrate()
            await store.write(lambda conn: _queue_one_message(conn, keyring))
            stop = asyncio.Event()
            worker = asyncio.create_task(DeliveryWorker(Services(settings, store, keyring)).run(stop))
            started = time.monotonic()
            try:
                await asyncio.to_thread(relay.wait_for_messages, 1, 15)
                return time.monotonic() - started
            finally:
                stop.set()
                await worker
        finally:
            await store.close()

    with Receiver() as relay:
        took = asyncio.run(deliver(relay))
        assert len(relay.messages) == 1
    assert store.went_away
    rows = asyncio.run(_rows(database_url))
    assert rows == [("delivered", None)]
    assert took < STORE_AWAY + 3, took  # not the 60 s lease
    print(f"\n{failure}: delivered {took:.1f} s after the claim (the store was away {STORE_AWAY} s)")


async def _rows(database_url: str) -> list[tuple[str, str | None]]:
    database = Database(database_url)
    try:
        return await database.read(
            lambda conn: [
                (row.state, row.locked_by)
                for row in conn.execute(sa.select(recipients.c.state, recipients.c.locked_by))
            ]
        )
    finally:
        await database.close()
