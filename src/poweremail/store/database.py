"""Opening the database: URL forms, per-backend tuning, read and write transactions, migrations.

Every query runs through an async driver (aiosqlite, asyncpg) so no coroutine blocks the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

Dialect = Literal["sqlite", "postgresql"]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant: two nodes starting at once must not both run the migrations (PostgreSQL).
_MIGRATION_LOCK_KEY = 0x50_6F_77_45_4D_61_69_6C  # "PowEMail"
# How long a SQLite connection waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_SECONDS = 30


class DatabaseUrlError(ValueError):
    """The URL names no database PowerEmail can use."""


class DatabaseUnavailableError(Exception):
    """The database cannot be reached or opened; the message says which and why, in one line."""


def async_url(url: str) -> URL:
    """Map the URLs users write (``sqlite:///…``, ``postgresql://…``) to their async drivers."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(f"not a database URL: {display_url(url)!r}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise DatabaseUrlError(
        f"unsupported database {backend!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )


def display_url(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


class Database:
    """One engine, and the two kinds of transaction the repositories use.

    ``read()`` gives a snapshot for queries; ``write()`` a transaction that will write. On SQLite a
    write transaction starts with ``BEGIN IMMEDIATE``: it takes the write lock up front, so two
    writers never deadlock upgrading a read lock (SQLITE_BUSY that no busy timeout can fix). Writers
    within one process also queue on an asyncio lock instead of sleeping in SQLite's busy handler.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        sa_url = async_url(url)
        self.dialect: Dialect = "sqlite" if sa_url.get_backend_name() == "sqlite" else "postgresql"
        options: dict[str, Any] = {
            # Parameters (ciphertexts, token hashes) never reach a log line or an exception message.
            "hide_parameters": True,
            "echo": echo,
        }
        if self.dialect == "sqlite":
            database = sa_url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}
        else:
            options["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(sa_url, **options)
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        if self.dialect == "sqlite":
            _tune_sqlite(self.engine)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn, conn.begin():
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.engine.connect() as conn:
            conn = await conn.execution_options(poweremail_write=True)
            async with conn.begin():
                yield conn

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent; safe with concurrent nodes)."""
        try:
            async with self.write() as conn:
                if self.dialect == "postgresql":
                    await conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                    )
                await conn.run_sync(_upgrade_to_head)
        except (SQLAlchemyError, OSError, asyncpg.PostgresError) as exc:
            # asyncpg raises OSError (refused, unknown host) or its own errors (no such database,
            # authentication) before SQLAlchemy can wrap them.
            lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            reason = lines[0] if lines else type(exc).__name__
            raise DatabaseUnavailableError(
                f"cannot open the database {display_url(self.url)}: {reason}"
            ) from exc

    async def close(self) -> None:
        await self.engine.dispose()


def _upgrade_to_head(sync_conn: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = sync_conn
    command.upgrade(config, "head")


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below); the driver's implicit transactions would get in the way.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer. synchronous=FULL: a commit is on stable storage
        # before it returns (SPEC §4: 250 only once durable). foreign_keys: SQLite's default is off.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        writes = conn.get_execution_options().get("poweremail_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")
