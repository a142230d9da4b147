"""Database.read/write semantics, whatever batching the store does underneath (SQLite group
commit; PostgreSQL one transaction each): each transaction is all or nothing, its caller gets its
own result or exception, and a write is visible to every read that starts after it returned."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
