"""Opening the database, and running transactions on it without blocking the event loop.

A transaction is one plain (synchronous) function of a SQLAlchemy ``Connection``; the repositories
are such functions. ``Database.read(work)`` and ``Database.write(work)`` run it off the event loop,
in one hop:

- SQLite: in threads, on the standard library's ``sqlite3``, in batches (``_sqlite_batches``): one
  writer thread that commits every waiting write transaction at once (group commit; SQLite has one
  writer at a time anyway), and two reader threads (WAL lets readers run beside the writer).
  Measured: aiosqlite, which hops to its thread for every cursor call (13 hops for listSmtp, about
  100 µs each), made listSmtp 25x slower than the bare web stack.
- PostgreSQL: on asyncpg, through ``AsyncConnection.run_sync``, which lets the same synchronous
  function drive the async driver.

``Database.read_now(work)`` is for one small read that is cheaper than any hop: on SQLite it runs on
the calling thread (the event loop), outside a transaction.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from poweremail.store._sqlite_batches import BatchingWorkers

logger = logging.getLogger("poweremail.store")

Dialect = Literal["sqlite", "postgresql"]
T = TypeVar("T")
Work = Callable[[Connection], T]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant: two nodes starting at once must not both run the migrations (PostgreSQL).
_MIGRATION_LOCK_KEY = 0x50_6F_77_45_4D_61_69_6C  # "PowEMail"
# How long a SQLite connection waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_SECONDS = 30
# Reader threads for SQLite. Two, so one slow read (a large listSmtp) does not hold up the others;
# more only trade the GIL more often (measured: 4 threads were no faster than 1).
SQLITE_READERS = 2
# PostgreSQL connections per process at most.
PG_POOL_SIZE = 20


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
        self._readers: BatchingWorkers | None = None
        self._now_connection: Connection | None = None  # read_now's, used on the event loop only
        self._writer: BatchingWorkers | None = None
        # hide_parameters: ciphertexts, token hashes and message bodies never reach a log line or
        # an exception message.
        if self.dialect == "sqlite":
            database = sa_url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self._sync_engine = create_engine(
                sa_url,
                hide_parameters=True,
                # One connection per thread that can use one (readers, writer, migrations) and
                # read_now's, kept open: no churn under load.
                pool_size=SQLITE_READERS + 3,
                max_overflow=0,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            )
            _tune_sqlite(self._sync_engine)
            self._readers = BatchingWorkers(
                self._sync_engine, writes=False, threads=SQLITE_READERS, name="sqlite-read"
            )
            self._writer = BatchingWorkers(self._sync_engine, writes=True, threads=1, name="sqlite-write")
        else:
            # Up to 20 connections, all kept once opened. Measured: with 10 kept and 10 overflow, a
            # busy node closed and reopened connections all the time (asyncpg's connect was 8% of
            # the SMTP benchmark's CPU).
            self._async_engine = create_async_engine(
                sa_url, hide_parameters=True, pool_pre_ping=True, pool_size=PG_POOL_SIZE, max_overflow=0
            )

    async def read(self, work: Work[T]) -> T:
        return await self._run(work, writes=False)

    async def read_now(self, work: Work[T]) -> T:
        """``work`` as ``read`` does, but on SQLite at once on the calling thread, on a connection of
        its own, outside any transaction: for a single statement that reads a bounded number of rows
        (SQLite gives each statement a snapshot of its own). Where SQLite cannot read at once (a
        lock held by another process), ``work`` goes to the reader threads instead.

        Measured: listSmtp for 10 users spent more in the hop to a reader thread and in SQLAlchemy
        checking out a connection and opening and closing its transaction than in the query
        (4,750 -> 7,500-8,000 requests/s).
        """
        if self._sync_engine is None:
            return await self.read(work)
        if self._now_connection is None:
            # In a thread: opening sets the journal mode, which waits while another process holds
            # the database's lock.
            opened = await asyncio.to_thread(self._open_now_connection)
            if self._now_connection is None:
                self._now_connection = opened
            else:  # another read_now opened one meanwhile
                opened.close()
        conn = self._now_connection
        try:
            return work(conn)
        except (sqlite3.OperationalError, OperationalError):
            logger.debug("SQLite could not read at once; reading in a thread", exc_info=True)
        finally:
            if conn.in_transaction():  # work used conn.execute: no snapshot may stay open
                conn.rollback()
        return await self.read(work)

    def _open_now_connection(self) -> Connection:
        assert self._sync_engine is not None
        conn = self._sync_engine.connect()
        # Never wait on the event loop: a database locked by another process is left to the
        # reader threads, which wait for it.
        conn.exec_driver_sql("PRAGMA busy_timeout=0")
        if conn.in_transaction():
            conn.rollback()
        # No BEGIN (see _on_begin): each statement is its own read transaction, with a snapshot of
        # its own; SQLAlchemy's BEGIN and ROLLBACK around it cost more than the login's query
        # (measured: the login read on SQLite 50 -> 35 µs).
        return conn.execution_options(poweremail_statement_snapshots=True)

    async def write(self, work: Work[T], *, alone: bool = False) -> T:
        """``work`` in a write transaction. SQLite batches concurrent writes into one transaction
        (group commit); ``alone`` keeps this one out of any batch, so that the others do not wait
        for it (the parts of a large message, store/message_parts.py). On PostgreSQL every write is alone."""
        return await self._run(work, writes=True, alone=alone)

    async def _run(self, work: Work[T], *, writes: bool, alone: bool = False) -> T:
        if self._async_engine is not None:
            async with self._async_engine.connect() as conn, conn.begin():
                return await conn.run_sync(work)
        workers = self._writer if writes else self._readers
        assert workers is not None
        result: T = await workers.submit(work, alone=alone)
        return result

    def _run_alone(self, work: Work[T]) -> T:
        """A write transaction of its own, outside the batches (migrations: DDL, not in a savepoint)."""
        assert self._sync_engine is not None
        with self._sync_engine.connect() as conn:
            conn = conn.execution_options(poweremail_write=True)
            with conn.begin():
                return work(conn)

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent; safe with concurrent nodes)."""
        try:
            if self._async_engine is not None:
                await self.write(_migrate)
            else:
                await asyncio.to_thread(self._run_alone, _migrate)
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
        if self._now_connection is not None:
            self._now_connection.close()
            self._now_connection = None
        for workers in (self._readers, self._writer):
            if workers is not None:
                await asyncio.to_thread(workers.close)
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
        options = conn.get_execution_options()
        if options.get("poweremail_statement_snapshots", False):
            return  # read_now's connection: SQLite's autocommit mode
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("poweremail_write", False) else "BEGIN")
