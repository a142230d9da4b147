"""The store goes away (issue 6, item 3): PostgreSQL restarts under load, or SQLite's disk is full or
fails. SMTP answers 451 4.3.0 and never 250 for what was not stored, the API answers GeneralError, and
both recover on their own when the store is back.

Figures are printed (``pytest -s``) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from poweremail.store.database import Database

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
