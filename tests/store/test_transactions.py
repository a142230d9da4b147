"""Database.read/write semantics, whatever batching the store does underneath (SQLite group
commit; PostgreSQL one transaction each): each transaction is all or nothing, its caller gets its
own result or exception, and a write is visible to every read that starts after it returned."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store import owners
from poweremail.store.database import Database
from poweremail.store.schema import owners as owners_table
from tests.support import run


class Refused(Exception):
    pass


def _create_then_maybe_fail(fail: bool) -> Callable[[Connection], str]:
    def work(conn: Connection) -> str:
        owner = owners.create_owner(conn, name="batch")
        if fail:
            raise Refused(owner.owner_id)
        return owner.owner_id

    return work


async def _many_writes(url: str) -> tuple[list[object], set[str]]:
    database = Database(url)
    try:
        await database.migrate()
        results = await asyncio.gather(
            *(database.write(_create_then_maybe_fail(i % 3 == 0)) for i in range(120)),
            return_exceptions=True,
        )
        stored = await database.read(
            lambda conn: set(
                conn.scalars(sa.select(owners_table.c.owner_id).where(owners_table.c.name == "batch"))
            )
        )
    finally:
        await database.close()
    return list(results), stored


def test_concurrent_writes_are_each_all_or_nothing(database_url: str) -> None:
    results, stored = run(_many_writes(database_url))
    failed = [r for r in results if isinstance(r, BaseException)]
    succeeded = [r for r in results if isinstance(r, str)]
    assert len(failed) == 40 and all(isinstance(error, Refused) for error in failed)
    assert len(succeeded) == 80
    # Exactly the transactions that returned are stored; the failed ones left nothing behind.
    assert stored == set(succeeded)
    assert not {str(error) for error in failed} & stored


async def _read_after_write(url: str) -> list[bool]:
    database = Database(url)
    try:
        await database.migrate()

        async def one() -> bool:
            owner_id = await database.write(_create_then_maybe_fail(False))
            found = await database.read(
                lambda conn: conn.scalar(
                    sa.select(owners_table.c.id).where(owners_table.c.owner_id == owner_id)
                )
            )
            return found is not None

        return list(await asyncio.gather(*(one() for _ in range(50))))
    finally:
        await database.close()


def test_a_read_sees_every_write_that_returned_before_it(database_url: str) -> None:
    assert run(_read_after_write(database_url)) == [True] * 50


async def _read_error(url: str) -> None:
    database = Database(url)
    try:
        await database.migrate()
        await database.read(lambda conn: conn.execute(sa.text("SELECT * FROM no_such_table")))
    finally:
        await database.close()


def test_an_error_in_a_read_reaches_its_caller(database_url: str) -> None:
    with pytest.raises(
        sa.exc.OperationalError if database_url.startswith("sqlite") else sa.exc.ProgrammingError
    ):
        run(_read_error(database_url))


def test_a_write_alone_is_never_batched_with_others(tmp_path: Path) -> None:
    """SQLite batches concurrent writes into one transaction; one written ``alone`` (a large message)
    gets a transaction of its own, and the writes queued before it are committed without waiting
    for it. (On PostgreSQL every write is its own transaction.)"""
    database = Database(f"sqlite:///{tmp_path / 'alone.sqlite3'}")
    commits = [0]
    assert database._sync_engine is not None
    sa.event.listen(database._sync_engine, "commit", lambda _conn: commits.__setitem__(0, commits[0] + 1))
    gate = threading.Event()
    seen: dict[str, int] = {}

    def job(name: str) -> Callable[[Connection], None]:
        def work(conn: Connection) -> None:
            if name == "first":
                gate.wait(10)  # holds the writer while the others queue up behind it
            seen[name] = commits[0]

        return work

    async def main() -> None:
        try:
            first = asyncio.create_task(database.write(job("first")))
            await asyncio.sleep(0.05)
            others = [
                asyncio.create_task(database.write(job(name), alone=name == "large"))
                for name in ("a", "b", "large", "c", "d")
            ]
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.gather(first, *others)
        finally:
            await database.close()

    run(main())
    assert seen["a"] == seen["b"] < seen["large"] < seen["c"] == seen["d"], seen


def _owner_count(conn: Connection) -> tuple[int, int]:
    """How many owners there are, and on which thread that was read."""
    count = conn.scalar(sa.select(sa.func.count()).select_from(owners_table))
    return int(count or 0), threading.get_ident()


def test_read_now_reads_on_the_calling_thread_and_leaves_no_transaction_open(tmp_path: Path) -> None:
    """SQLite: at once, on the event loop's thread; it sees what was written before it, and a work
    that opened a transaction (conn.execute) has it closed, so no snapshot stays pinned."""

    async def scenario() -> list[tuple[int, int]]:
        database = Database(f"sqlite:///{tmp_path / 'now.sqlite3'}")
        try:
            await database.migrate()
            seen = [await database.read_now(_owner_count)]
            await database.write(lambda conn: owners.create_owner(conn, name="now"))
            seen.append(await database.read_now(_owner_count))
            assert database._now_connection is not None and not database._now_connection.in_transaction()
            return seen
        finally:
            await database.close()

    assert run(scenario()) == [(0, threading.get_ident()), (1, threading.get_ident())]


def test_read_now_does_not_block_the_event_loop_on_a_locked_database(tmp_path: Path) -> None:
    """Another process holding SQLite's lock when read_now first opens its connection: the event
    loop goes on while it waits (opening sets the journal mode, which needs the lock)."""
    path = tmp_path / "locked.sqlite3"

    async def create() -> None:
        database = Database(f"sqlite:///{path}")
        await database.migrate()
        await database.write(lambda conn: owners.create_owner(conn, name="before"))
        await database.close()

    run(create())
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("PRAGMA locking_mode=EXCLUSIVE")  # in WAL mode, only this keeps readers out
    blocker.execute("BEGIN EXCLUSIVE")
    blocker.execute("UPDATE owners SET name = 'locked'")
    blocker.execute("COMMIT")  # the exclusive lock stays until the connection closes

    async def scenario() -> tuple[int, int]:
        database = Database(f"sqlite:///{path}")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        asyncio.get_running_loop().call_later(0.5, blocker.close)
        try:
            count, _ = await database.read_now(_owner_count)
            return count, ticks
        finally:
            ticker.cancel()
            await database.close()

    count, ticks = run(scenario())
    assert count == 1
    assert ticks >= 20, f"the event loop ticked {ticks} times in the 0.5 s the database was locked"


def test_read_now_leaves_a_read_sqlite_refuses_at_once_to_the_reader_threads(tmp_path: Path) -> None:
    """read_now's connection never waits (busy_timeout 0): a read that SQLite refuses on it because
    the database is busy runs again in a reader thread, which waits for the lock."""
    loop_thread = threading.get_ident()
    tries: list[int] = []

    def busy_on_the_loop(conn: Connection) -> tuple[int, int]:
        tries.append(threading.get_ident())
        if threading.get_ident() == loop_thread:
            raise sqlite3.OperationalError("database is locked")
        return _owner_count(conn)

    async def scenario() -> tuple[int, int]:
        database = Database(f"sqlite:///{tmp_path / 'busy.sqlite3'}")
        try:
            await database.migrate()
            return await database.read_now(busy_on_the_loop)
        finally:
            await database.close()

    count, thread = run(scenario())
    assert count == 0 and thread != loop_thread
    assert tries == [loop_thread, thread]
