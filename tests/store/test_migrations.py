"""The migrations create exactly the schema of ``poweremail.store.schema`` on each backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from poweremail.store.database import Database
from poweremail.store.schema import metadata
from tests.support import run


def _diff(sync_conn: Connection) -> list[object]:
    context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def _migrate_twice_and_diff(url: str) -> list[object]:
    database = Database(url)
    try:
        await database.migrate()
        await database.migrate()  # idempotent
        return await database.read(_diff)
    finally:
        await database.close()


def test_migrations_match_the_schema(database_url: str) -> None:
    assert run(_migrate_twice_and_diff(database_url)) == []
