"""Helpers the tests share: real server processes, fresh databases, owners."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from sqlalchemy import Connection, make_url

from poweremail.keyring import Keyring
from poweremail.store import owners, smtp_users
from poweremail.store.database import Database
from poweremail.store.delivery_queue import load_messages

T = TypeVar("T")
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# Ports for the test servers come from below the kernel's ephemeral range, each handed out once per
# process. A server restarted on its port (the crash tests restart one many times) could otherwise
# find the port taken meanwhile by an outgoing connection the kernel gave it to, or a client
# reconnecting to the dead port could be connected to itself (TCP simultaneous open).
_LOWEST_PORT = 10_000
_handed_out: set[int] = set()


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    choices = range(_LOWEST_PORT, max(_ephemeral_ports_start(), _LOWEST_PORT + 1000))
    for _ in range(1000):
        port = random.choice(choices)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # someone listens there
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {choices}")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child ``poweremail``, without the developer's POWEREMAIL_* settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("POWEREMAIL_")}
    env.update(extra)
    return env


def poweremail(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poweremail", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else clean_env(),
        check=False,
    )


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_server_url() -> str:
    return os.environ.get("POWEREMAIL_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_postgres_database() -> str:
    """A new, empty database on the test server; returns its URL. Raises OSError if unreachable."""
    server = make_url(postgres_server_url())
    name = f"poweremail_test_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(_asyncpg_dsn(postgres_server_url()), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.set(database=name).render_as_string(hide_password=False)


async def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    conn = await asyncpg.connect(_asyncpg_dsn(postgres_server_url()), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- servers ----------------------------------------------------------------------------------


def _answers_http(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _answers_smtp(port: int) -> bool:
    """A 220 greeting: ports are bound before the store opens, so accepting is not enough."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(4).startswith(b"220")
    except OSError:
        return False


@dataclass
class ServerProcess:
    """``poweremail serve`` in a child process, on free loopback ports."""

    data_dir: Path
    database_url: str
    log_path: Path
    api_port: int = field(default_factory=free_port)
    smtp_port: int = field(default_factory=free_port)
    smtps_port: int = field(default_factory=free_port)
    roles: str = "api,smtp"
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 30) -> ServerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, env=clean_env()
            )
        self._wait_until_ready(timeout)
        return self

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "poweremail", "serve",
            "--data-dir", str(self.data_dir),
            "--database-url", self.database_url,
            "--api-port", str(self.api_port),
            "--smtp-port", str(self.smtp_port),
            "--smtps-port", str(self.smtps_port),
            "--roles", self.roles,
            *self.extra_args,
        ]  # fmt: skip

    def _wait_until_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._output_done()
                raise RuntimeError(self._start_failure(f"exited early (exit code {self.process.returncode})"))
            if self._ready():
                return
            time.sleep(0.05)
        raise RuntimeError(self._start_failure(f"did not answer within {timeout}s"))

    def _output_done(self) -> None:
        """The process has exited: wait until all its output is in the log (it writes there itself)."""

    def _start_failure(self, what: str) -> str:
        # The reason both first and last: a CI log may show only a part of a long message.
        reason = f"poweremail serve (pid {self.process.pid if self.process else '?'}) {what}"
        tail = "\n".join(self.log().splitlines()[-60:])
        return f"{reason}; the last 60 lines of {self.log_path}:\n{tail}\n{reason}"

    def _ready(self) -> bool:
        if "api" in self.roles and not _answers_http(self.api_port):
            return False
        return "smtp" not in self.roles or _answers_smtp(self.smtp_port)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, call: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        if body is not None:
            kwargs["json"] = body
        return httpx.post(f"{self.base_url}/settings/{call}", timeout=30, **kwargs)


# --- owners -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    owner_id: str
    token: str

    def creds(self, **params: Any) -> dict[str, Any]:
        return {"owner_id": self.owner_id, "token": self.token, **params}


async def _in_store(database_url: str, work: Callable[[Connection], T], *, writes: bool) -> T:
    database = Database(database_url)
    try:
        return await (database.write(work) if writes else database.read(work))
    finally:
        await database.close()


def store_write(database_url: str, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in a write transaction on that database, as the server's code does."""
    return run(_in_store(database_url, work, writes=True))


def store_read(database_url: str, work: Callable[[Connection], T]) -> T:
    return run(_in_store(database_url, work, writes=False))


def stored_bodies(conn: Connection, message_ids: Collection[int]) -> dict[int, bytes]:
    """The bytes stored for each message, as delivery reads them (inline, or written ahead in parts);
    a message without them is absent."""
    return {message_id: loaded.data for message_id, loaded in load_messages(conn, message_ids).items()}


def create_owner(database_url: str) -> Owner:
    owner = store_write(database_url, lambda conn: owners.create_owner(conn, name="test"))
    return Owner(owner.owner_id, owner.token)


def new_owner_with_user(
    conn: Connection, keyring: Keyring, *, total_limit: int, hourly_limit: int, name: str | None = None
) -> tuple[owners.NewOwner, int, str]:
    """An owner with one SMTP user, made in ``conn``'s transaction: the owner, the user's id and name."""
    owner = owners.create_owner(conn, name=name)
    owner_pk = owners.authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
    assert owner_pk is not None
    user_name, _ = smtp_users.create_smtp_user(
        conn, owner_pk=owner_pk, keyring=keyring, total_limit=total_limit, hourly_limit=hourly_limit
    )
    user_id = smtp_users.find_smtp_user_id(conn, owner_pk=owner_pk, name=user_name)
    assert user_id is not None
    return owner, user_id, user_name
