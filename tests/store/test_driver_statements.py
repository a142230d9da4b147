"""DriverStatement: rows written by SQLite's driver are the rows SQLAlchemy would have written
(types' bind processing, values fixed in the statement, NULLs), its errors are SQLAlchemy's, and
on PostgreSQL it is plain Core."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from poweremail.store.database import Database
from poweremail.store.driver_statements import DriverStatement
from poweremail.store.schema import UtcDateTime
from tests.support import run

_metadata = sa.MetaData()
_items = sa.Table(
    "driver_statement_items",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("note", sa.String(64)),
)
_INSERT = DriverStatement(_items.insert())
_TOUCH = DriverStatement(
    _items.update()
    .where(_items.c.name == sa.bindparam("item"))
    .values(at=sa.bindparam("when"), count=_items.c.count + 1, note=None)
)
T0 = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)


def _on_database(url: str, *works: Any) -> list[Any]:
    async def go() -> list[Any]:
        database = Database(url)
        try:
            await database.write(lambda conn: _metadata.create_all(conn))
            results = []
            for work in works:
                try:
                    results.append(await database.write(work))
                except Exception as error:
                    results.append(error)
            return results
        finally:
            await database.close()

    return run(go())


def _rows(conn: Connection) -> list[tuple[Any, ...]]:
    query = sa.select(_items.c.name, _items.c.at, _items.c.count, _items.c.note).order_by(_items.c.name)
    return [tuple(row) for row in conn.execute(query)]


def test_rows_are_stored_as_sqlalchemy_stores_them(database_url: str) -> None:
    later = T0 + timedelta(minutes=5)
    rows = [{"name": f"n{i}", "at": T0, "count": i, "note": "x" if i else None} for i in range(3)]
    *_, stored = _on_database(
        database_url,
        lambda conn: _INSERT.executemany(conn, rows),
        lambda conn: _TOUCH.executemany(conn, [{"item": "n1", "when": later}, {"item": "n2", "when": later}]),
        _rows,
    )
    # The UTC datetime comes back equal (the text SQLite holds is the one Core writes and reads),
    # count = count + 1 and note = NULL came from the statement, not the rows.
    assert stored == [("n0", T0, 0, None), ("n1", later, 2, None), ("n2", later, 3, None)]
    # Core reads back what the driver wrote, compared in SQL too (a text format of our own would
    # sort differently from Core's bound parameter).
    *_, found = _on_database(
        database_url, lambda conn: conn.scalars(sa.select(_items.c.name).where(_items.c.at > T0)).all()
    )
    assert sorted(found) == ["n1", "n2"]


def test_a_failing_row_is_sqlalchemys_error_and_leaves_nothing(database_url: str) -> None:
    def insert_twice(conn: Connection) -> None:
        _INSERT.executemany(conn, [{"name": "dup", "at": T0, "count": 1, "note": None}])
        _INSERT.executemany(conn, [{"name": "ok", "at": T0, "count": 1, "note": None}] * 2)

    failed, stored = _on_database(database_url, insert_twice, _rows)
    assert isinstance(failed, IntegrityError)
    assert stored == []


def test_insert_each_returns_each_rows_id_in_order(tmp_path: Path) -> None:
    rows = [{"name": f"e{i}", "at": T0, "count": i, "note": None} for i in (5, 3, 9)]

    def ids_and_counts(conn: Connection) -> list[tuple[int, int]]:
        return [(row.id, row.count) for row in conn.execute(sa.select(_items.c.id, _items.c.count))]

    ids, stored = _on_database(
        f"sqlite:///{tmp_path / 'driver.sqlite3'}",
        lambda conn: _INSERT.insert_each(conn, rows),
        ids_and_counts,
    )
    assert sorted(zip(ids, [5, 3, 9], strict=True)) == sorted(stored)
    assert len(set(ids)) == 3


def test_a_value_missing_from_the_rows_is_refused(tmp_path: Path) -> None:
    (failed,) = _on_database(
        f"sqlite:///{tmp_path / 'driver.sqlite3'}",
        lambda conn: _TOUCH.executemany(conn, [{"item": "n1"}]),
    )
    assert isinstance(failed, KeyError) and "when" in str(failed)


def test_no_rows_is_no_statement(database_url: str) -> None:
    nothing, stored = _on_database(database_url, lambda conn: _INSERT.executemany(conn, []), _rows)
    assert nothing is None and stored == []
