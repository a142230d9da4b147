"""Opening the database, and running transactions on it without blocking the event loop.

A transaction is one plain (synchronous) function of a SQLAlchemy ``Connection``; the repositories
are such functions. ``Database.read(work)`` and ``Database.write(work)`` run it off the event loop,
in one hop:

- SQLite: in a thread, on the standard library's ``sqlite3``. One writer thread (SQLite has one
  writer at a time anyway) and a few reader threads (WAL lets readers run beside the writer).
  Measured: aiosqlite, which hops to its thread for every cursor call (13 hops for listSmtp, about
  100 µs each), made listSmtp 25x slower than the bare web stack; one hop per transaction is the fix.
- PostgreSQL: on asyncpg, through ``AsyncConnection.run_sync``, which lets the same synchronous
  function drive the async driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

Dialect = Literal["sqlite", "postgresql"]
T = TypeVar("T")
Work = Callable[[Connection], T]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant: two nodes starting at once must not both run the migrations (PostgreSQL).
_MIGRATION_LOCK_KEY = 0x50_6F_77_45_4D_61_69_6C  # "PowEMail"
# How long a SQLite connection waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_SECONDS = 30
# Reader threads for SQLite: reads spend most of their time in sqlite3 with the GIL released, so a
# few threads keep two cores busy; more only add switching.
SQLITE_READERS = 4


class DatabaseUrlError(ValueError):
    """The URL names no database PowerEmail can use."""


class DatabaseUnavailableError(Exception):
    """The database cannot be reached or opened; the message says which and why, in one line."""


def parse_url(url: str) -> URL:
    """The URLs users write (``sqlite:///…``, ``postgresql://…``) with the drivers we use."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(f"not a database URL: {display_url(url)!r}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+pysqlite")
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
    """The store: ``await read(work)`` for queries, ``await write(work)`` for changes.

    ``work`` runs inside a transaction that commits when it returns and rolls back when it raises.
    On SQLite a write transaction starts with ``BEGIN IMMEDIATE``: it takes the write lock up front,
    so two writers (say, two processes) never deadlock upgrading a read lock (SQLITE_BUSY that no
    busy timeout can fix).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        sa_url = parse_url(url)
        self.dialect: Dialect = "sqlite" if sa_url.get_backend_name() == "sqlite" else "postgresql"
        self._sync_engine: Engine | None = None
        self._async_engine: AsyncEngine | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        # hide_parameters: ciphertexts, token hashes and message bodies never reach a log line or
        # an exception message.
        if self.dialect == "sqlite":
            database = sa_url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self._sync_engine = create_engine(
                sa_url,
                hide_parameters=True,
                # One connection per thread that can use one, kept open (no churn under load).
                pool_size=SQLITE_READERS + 1,
                max_overflow=0,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            )
            _tune_sqlite(self._sync_engine)
            self._readers = ThreadPoolExecutor(SQLITE_READERS, thread_name_prefix="sqlite-read")
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-write")
        else:
            self._async_engine = create_async_engine(
                sa_url, hide_parameters=True, pool_pre_ping=True, pool_size=10, max_overflow=10
            )

    async def read(self, work: Work[T]) -> T:
        return await self._run(work, writes=False)

    async def write(self, work: Work[T]) -> T:
        return await self._run(work, writes=True)

    async def _run(self, work: Work[T], *, writes: bool) -> T:
        if self._async_engine is not None:
            async with self._async_engine.connect() as conn, conn.begin():
                return await conn.run_sync(work)
        executor = self._writer if writes else self._readers
        return await asyncio.get_running_loop().run_in_executor(executor, self._run_in_thread, work, writes)

    def _run_in_thread(self, work: Work[T], writes: bool) -> T:
        assert self._sync_engine is not None
        with self._sync_engine.connect() as conn:
            conn = conn.execution_options(poweremail_write=writes)
            with conn.begin():
                return work(conn)

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent; safe with concurrent nodes)."""
        try:
            await self.write(_migrate)
        except (SQLAlchemyError, OSError, asyncpg.PostgresError) as exc:
            # asyncpg raises OSError (refused, unknown host) or its own errors (no such database,
            # authentication) before SQLAlchemy can wrap them.
            lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            reason = lines[0] if lines else type(exc).__name__
            raise DatabaseUnavailableError(
                f"cannot open the database {display_url(self.url)}: {reason}"
            ) from exc

    async def close(self) -> None:
        if self._async_engine is not None:
            await self._async_engine.dispose()
        for executor in (self._readers, self._writer):
            if executor is not None:
                executor.shutdown(wait=True)
        if self._sync_engine is not None:
            self._sync_engine.dispose()


def _migrate(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    command.upgrade(config, "head")


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
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

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        writes = conn.get_execution_options().get("poweremail_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")
