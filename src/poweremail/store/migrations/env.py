"""Alembic environment. ``poweremail`` runs migrations itself (``Database.migrate``) on a
connection it passes in; developers may also run ``alembic`` with POWEREMAIL_DATABASE_URL set."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection

from poweremail.store.database import Database
from poweremail.store.schema import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    database = Database(os.environ.get("POWEREMAIL_DATABASE_URL", "sqlite:///data/poweremail.sqlite3"))
    try:
        await database.write(_run)
    finally:
        await database.close()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_standalone())
