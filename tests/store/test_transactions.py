"""Database.read/write semantics, whatever batching the store does underneath (SQLite group
commit; PostgreSQL one transaction each): each transaction is all or nothing, its caller gets its
own result or exception, and a write is visible to every read that starts after it returned."""

from __future__ import annotations

import asyncio
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
