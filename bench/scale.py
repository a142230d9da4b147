"""Benchmark of cost as the store grows: 1,000 against 1,000,000 SMTP users (issue 5, target 5).

    python bench/scale.py [--database-url postgresql://USER@HOST:PORT/DB] [--users 1000000] [--runs 3]
                          [--duration 6] [--lock /tmp/pe-cpu.lock] [--quick]

For each store (SQLite always; ``--database-url postgresql://…`` adds PostgreSQL, on a fresh database
``poweremail_scale_<random>`` created with asyncpg and dropped at the end, the named database only
used to connect; ``--quick`` is a smoke test with 20,000 users):

1. Fills two stores straight into the tables, the way ``store/smtp_users.py`` writes a user (a
   name ``smtp`` + 10 digits, a 20-character password encrypted with the store's keyring, AES-GCM
   bound to the name): a small one of 1,000 SMTP users and a large one of ``--users`` (1,000,000),
   spread over owners of 1,000 users each. Both hold an owner with 10 users; the large one also an
   owner with 10,000. Passwords derive from the name and a per-run secret, so the benchmark knows
   every user's password without keeping a million of them. Filling is setup, not measured; with
   ``--lock FILE`` it happens outside the lock and every measurement inside it.
2. Starts ``poweremail serve --roles api,smtp`` on each store and measures both, alternating (small,
   large; then large, small in the next run) so drift of the machine touches both alike:
   SMTP login (a new connection, EHLO, AUTH PLAIN as a random user of the store, QUIT: logins/s and
   latency, 8 clients at once), addSmtp and listSmtp of the 10-user owner (wrk, 16 connections, as
   bench/api.py). The cost is time per operation at full load (1 / throughput); the ratio is the
   large store's median cost over the small one's; target <= 1.3.
3. On the large store only: listSmtp of the 10,000-user owner (latency and bytes, one at a time),
   EXPLAIN of the login and listing statements (an index must serve them: no full scan of
   smtp_users), the serve process's RSS idle and with 1,000 idle SMTP sessions open (after EHLO;
   target <= 150 MB), and the p50/p99 of 20 sessions sending 1 KB messages (bench/smtp_load.py)
   without and with one more session uploading 25 MiB messages back to back (bench/smtp_load.py in a
   process of its own), as many times as --runs, the run of median ratio reported; "no stall" is
   read as a p99 with the upload at most twice the p99 without.

Writes docs/benchmarks/scale.md and docs/benchmarks/scale.json (one row per target: ours, baseline,
ratio, unit, goal, met). Needs wrk and, for PostgreSQL, a server the URL reaches. Exits 1 if a
request or a login failed, the server logged an error, or a statement scanned smtp_users whole (a
target not met is in the report, not in the exit status).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import platform
import random
import resource
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from _machine import cpu_model
from _servers import accepts, child_environment, free_port, running  # bench/ is on sys.path
from sqlalchemy import make_url
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

from api import Target, run_wrk
from poweremail.domain.credentials import PASSWORD_ALPHABET, PASSWORD_LENGTH, hash_owner_token
from poweremail.keyring import Keyring
from poweremail.store import smtp_users as smtp_users_store
from poweremail.store.schema import UtcDateTime
from smtp import asyncpg_dsn, create_database, drop_database, greets, server_errors, source_version

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
REPORT_PATH = REPO_ROOT / "docs" / "benchmarks" / "scale.md"
SQLITE = "sqlite"
SMALL = 1_000
OWNER_SIZE = 1_000  # filler owners hold this many users each
BIG_OWNER = 10_000
RATIO_GOAL = 1.3
RSS_GOAL_MB = 150
# "Does not stall other sessions", as a number: their p99 with the upload at most twice without it.
STALL_GOAL = 2.0
IDLE_SESSIONS = 1_000
LOGIN_CLIENTS = 8
WRK_CONNECTIONS = 16
STALL_SESSIONS = 20
MiB = 1024 * 1024
# Under the default 25 MiB SIZE limit with room for the server's own headers.
BIG_MESSAGE = 25 * MiB - 64 * 1024
MAX_LIMIT = 2_147_483_647
WARMUP_S = 2


def size_label(users: int) -> str:
    if users % 1_000_000 == 0:
        return f"{users // 1_000_000}M users"
    return f"{users // 1000}k users" if users % 1000 == 0 else f"{users:,} users"


# --- filling ------------------------------------------------------------------------------------


@dataclass
class Owner:
    owner_id: str
    token: str
    pk: int = 0

    def credentials(self) -> dict[str, str]:
        return {"owner_id": self.owner_id, "token": self.token}


@dataclass
class Fill:
    """What the benchmark needs to know of a filled store."""

    users: int
    small_owner: Owner
    writer: Owner
    big_owner: Owner | None
    sample_names: list[str]  # users to log in as, drawn from the whole table
    seconds: float = 0.0


def password_of(secret: bytes, name: str) -> str:
    """The password the fill gave ``name``: 20 characters of [A-Za-z0-9], as the service draws them."""
    number = int.from_bytes(hmac.new(secret, name.encode(), hashlib.sha256).digest())
    chars = []
    for _ in range(PASSWORD_LENGTH):
        number, index = divmod(number, len(PASSWORD_ALPHABET))
        chars.append(PASSWORD_ALPHABET[index])
    return "".join(chars)


def new_owner() -> Owner:
    return Owner(owner_id=secrets.token_hex(12), token=secrets.token_urlsafe(32))


def user_rows(
    keyring: Keyring, secret: bytes, names: list[str], owner_pk: int, now: Any
) -> Iterator[tuple[Any, ...]]:
    for name in names:
        key_id, blob = keyring.encrypt_password(password_of(secret, name), smtp_user_name=name)
        yield (name, owner_pk, blob, key_id, "Enable", 1_000_000, 1_000, now, now)


USER_COLUMNS = (
    "name", "owner_pk", "password_ciphertext", "password_key_id", "status", "total_limit",
    "hourly_limit", "created_at", "updated_at",
)  # fmt: skip


def plan_owners(total: int, *, big: bool) -> list[tuple[Owner, int]]:
    """(owner, how many users) adding up to ``total``: the 10-user owner, the 10,000-user owner if
    ``big``, an owner for addSmtp (no users yet) and fillers of OWNER_SIZE."""
    plan = [(new_owner(), 10), (new_owner(), 0)]
    if big:
        plan.append((new_owner(), BIG_OWNER))
    left = total - sum(count for _, count in plan)
    while left > 0:
        plan.append((new_owner(), min(OWNER_SIZE, left)))
        left -= plan[-1][1]
    return plan


def fill(store_url: str, data_dir: Path, total: int, secret: bytes, *, big: bool) -> Fill:
    """Fill a migrated store to ``total`` SMTP users, straight into the tables."""
    started = time.monotonic()
    keyring = Keyring.load(data_dir / "secret.key")
    keyring.follow_file = False  # one stat() per encryption otherwise
    plan = plan_owners(total, big=big)
    rng = random.Random(secret)
    # Unique names in the service's own space: "smtp", a non-zero digit, nine digits.
    names = [f"smtp{n}" for n in rng.sample(range(10**9, 10**10), total)]
    now = datetime.datetime.now(datetime.UTC)
    if store_url == SQLITE or store_url.startswith("sqlite"):
        fill_sqlite(data_dir / "poweremail.sqlite3", plan, names, keyring, secret, now)
    else:
        asyncio.run(fill_postgres(store_url, plan, names, keyring, secret, now))
    owners_by_role = [owner for owner, _ in plan]
    return Fill(
        users=total,
        small_owner=owners_by_role[0],
        writer=owners_by_role[1],
        big_owner=owners_by_role[2] if big else None,
        sample_names=rng.sample(names, min(2_000, total)),
        seconds=time.monotonic() - started,
    )


def owner_values(owner: Owner, now: Any) -> tuple[Any, ...]:
    return (owner.owner_id, "scale", hash_owner_token(owner.token), True, now)


def fill_sqlite(
    path: Path, plan: list[tuple[Owner, int]], names: list[str], keyring: Keyring, secret: bytes, now: Any
) -> None:
    stamp = now.strftime("%Y-%m-%d %H:%M:%S.%f")  # as SQLAlchemy stores a DateTime in SQLite
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")  # setup only: the server runs with FULL
        db.execute("BEGIN")
        position = 0
        for owner, count in plan:
            owner.pk = db.execute(
                "INSERT INTO owners (owner_id, name, token_sha256, is_active, created_at)"
                " VALUES (?, ?, ?, ?, ?) RETURNING id",
                owner_values(owner, stamp),
            ).fetchone()[0]
            chunk = names[position : position + count]
            position += count
            db.executemany(
                f"INSERT INTO smtp_users ({', '.join(USER_COLUMNS)}) VALUES ({', '.join('?' * 9)})",
                user_rows(keyring, secret, chunk, owner.pk, stamp),
            )
        db.execute("COMMIT")
    finally:
        db.close()


async def fill_postgres(
    url: str, plan: list[tuple[Owner, int]], names: list[str], keyring: Keyring, secret: bytes, now: Any
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url), timeout=10)
    try:
        position = 0
        for owner, count in plan:
            owner.pk = await conn.fetchval(
                "INSERT INTO owners (owner_id, name, token_sha256, is_active, created_at)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING id",
                *owner_values(owner, now),
            )
            chunk = names[position : position + count]
            position += count
            if chunk:
                await conn.copy_records_to_table(
                    "smtp_users", records=list(user_rows(keyring, secret, chunk, owner.pk, now)),
                    columns=list(USER_COLUMNS),
                )  # fmt: skip
        await conn.execute("ANALYZE")  # what autovacuum would have done to a store that grew this big
    finally:
        await conn.close()


# --- stores and servers ---------------------------------------------------------------------------


@contextlib.contextmanager
def store(kind: str, data_dir: Path) -> Iterator[str]:
    """A database URL for a fresh store; a PostgreSQL database is created here and dropped after."""
    data_dir.mkdir(parents=True)
    if kind == SQLITE:
        yield f"sqlite:///{(data_dir / 'poweremail.sqlite3').resolve()}"
        return
    name = f"poweremail_scale_{secrets.token_hex(6)}"
    asyncio.run(create_database(kind, name))
    try:
        yield make_url(kind).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(drop_database(kind, name))


def migrate(url: str, data_dir: Path) -> None:
    """Create the schema and the keyring, as the service does, by creating (and ignoring) an owner."""
    command = [sys.executable, "-m", "poweremail", "owner", "create", "--data-dir", str(data_dir),
               "--database-url", url, "--name", "migrate"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment())
    if done.returncode != 0:
        raise RuntimeError(f"poweremail owner create exited with {done.returncode}: {done.stderr.strip()}")


@dataclass
class Server:
    label: str
    url: str
    pid: int
    api_port: int
    smtp_port: int
    fill: Fill
    secret: bytes
    log: Path

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


def serve_command(url: str, data_dir: Path, api_port: int, smtp_port: int) -> list[str]:
    return [
        sys.executable, "-m", "poweremail", "serve", "--data-dir", str(data_dir), "--database-url", url,
        "--roles", "api,smtp", "--api-port", str(api_port), "--smtp-port", str(smtp_port),
        "--smtps-port", str(free_port()), "--max-connections-per-address", str(IDLE_SESSIONS + 100),
    ]  # fmt: skip


# --- measurements ---------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measurement: an operation's rate and latency on one server."""

    operation: str
    server: str
    run: int
    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def cost_us(self) -> float:
        return 1e6 / self.per_second if self.per_second else float("inf")


async def smtp_reply(reader: asyncio.StreamReader) -> bytes:
    """A whole (possibly multi-line) reply; its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def login_once(port: int, name: str, password: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for command, code in (
            (None, b"220"),
            (b"EHLO scale.bench\r\n", b"250"),
            (b"AUTH PLAIN " + b64encode(f"\0{name}\0{password}".encode()) + b"\r\n", b"235"),
            (b"QUIT\r\n", b"221"),
        ):
            if command is not None:
                writer.write(command)
            reply = await smtp_reply(reader)
            if not reply.startswith(code):
                raise RuntimeError(f"expected {code.decode()}, got {reply[:80]!r}")
    finally:
        writer.close()


async def login_load(server: Server, duration: float) -> tuple[int, int, list[float]]:
    names = server.fill.sample_names
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def client(offset: int) -> None:
        nonlocal errors
        i = offset
        while time.monotonic() < deadline:
            name = names[i % len(names)]
            i += LOGIN_CLIENTS
            started = time.monotonic()
            try:
                await asyncio.wait_for(
                    login_once(server.smtp_port, name, password_of(server.secret, name)), 30
                )
            except (OSError, RuntimeError, TimeoutError):
                errors += 1
                continue
            latencies.append(time.monotonic() - started)

    await asyncio.gather(*(client(k) for k in range(LOGIN_CLIENTS)))
    return len(latencies), errors, latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


def measure_logins(server: Server, run: int, duration: float) -> Figure:
    started = time.monotonic()
    count, errors, latencies = asyncio.run(login_load(server, duration))
    elapsed = time.monotonic() - started
    return Figure("SMTP login", server.label, run, count / elapsed, 1000 * percentile(latencies, 0.5),
                  1000 * percentile(latencies, 0.99), errors)  # fmt: skip


def measure_api(
    operation: str, server: Server, path: str, body: dict[str, Any], run: int, duration: int
) -> Figure:
    target = Target(operation, f"{server.api}/settings/{path}", json.dumps(body), server.pid)
    result = run_wrk(target, run=run, duration=duration, connections=WRK_CONNECTIONS, threads=1)
    return Figure(operation, server.label, run, result.rps, result.p50_ms, result.p99_ms,
                  result.non_2xx + result.socket_errors)  # fmt: skip


def api_bodies(server: Server) -> dict[str, tuple[str, dict[str, Any]]]:
    writer = {**server.fill.writer.credentials(), "total_limit": MAX_LIMIT, "hourly_limit": MAX_LIMIT}
    return {
        "addSmtp": ("addSmtp", writer),
        "listSmtp, 10 users": ("listSmtp", server.fill.small_owner.credentials()),
    }


def measure_all(servers: list[Server], runs: int, duration: int) -> list[Figure]:
    for server in servers:  # warm pools, page caches and CPU frequency; not counted
        asyncio.run(login_load(server, WARMUP_S))
        for operation, (path, body) in api_bodies(server).items():
            measure_api(operation, server, path, body, 0, WARMUP_S)
    figures: list[Figure] = []
    for run in range(1, runs + 1):
        order = servers if run % 2 else list(reversed(servers))
        for server in order:
            figures.append(measure_logins(server, run, duration))
            print(f"  run {run}  {line(figures[-1])}", flush=True)
            for operation, (path, body) in api_bodies(server).items():
                figures.append(measure_api(operation, server, path, body, run, duration))
                print(f"  run {run}  {line(figures[-1])}", flush=True)
    return figures


def line(f: Figure) -> str:
    errors = f"  ERRORS {f.errors}" if f.errors else ""
    return (f"{f.server:<12} {f.operation:<20} {f.per_second:9.1f}/s  p50 {f.p50_ms:8.2f} ms"
            f"  p99 {f.p99_ms:8.2f} ms{errors}")  # fmt: skip


@dataclass
class BigList:
    latencies_ms: list[float]
    bytes: int
    users: int


def measure_big_list(server: Server, times: int = 5) -> BigList:
    assert server.fill.big_owner is not None
    body = server.fill.big_owner.credentials()
    latencies, size, users = [], 0, 0
    with httpx.Client(base_url=server.api, timeout=120) as client:
        for _ in range(times + 1):
            started = time.monotonic()
            answer = client.post("/settings/listSmtp", json=body)
            latencies.append(1000 * (time.monotonic() - started))
            if answer.status_code != 200:
                raise RuntimeError(f"listSmtp (10,000 users) answered {answer.status_code}")
            size, users = len(answer.content), len(answer.json()["smtp_list"])
    return BigList(latencies_ms=latencies[1:], bytes=size, users=users)  # the first warms the cache


# --- EXPLAIN -------------------------------------------------------------------------------------


def statement_args(statement: Any, dialect: Any, params: dict[str, Any]) -> tuple[str, list[Any]]:
    compiled = statement.compile(dialect=dialect)
    values = {**compiled.params, **params}
    process = UtcDateTime().dialect_impl(dialect).bind_processor(dialect)
    if "hour_ago" in values and process is not None:
        values["hour_ago"] = process(values["hour_ago"])
    return str(compiled), [values[name] for name in compiled.positiontup]


def explain(server: Server, data_dir: Path) -> dict[str, list[str]]:
    """The query plans of the login lookup and the listing, as the server's store would run them."""
    hour_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    name = server.fill.sample_names[0]
    statements: dict[str, tuple[Any, dict[str, Any]]] = {
        "login (store/smtp_users.py _LOGIN)": (smtp_users_store._LOGIN, {"name": name}),
        "listSmtp (store/smtp_users.py _OWNER_LISTING)": (
            smtp_users_store._OWNER_LISTING,
            {"owner_id": server.fill.small_owner.owner_id, "hour_ago": hour_ago},
        ),
    }
    plans: dict[str, list[str]] = {}
    if server.url.startswith("sqlite"):
        db = sqlite3.connect(data_dir / "poweremail.sqlite3")
        try:
            for label, (statement, params) in statements.items():
                sql, args = statement_args(statement, sqlite_dialect.dialect(), params)
                plans[label] = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args)]
        finally:
            db.close()
        return plans

    async def postgres() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(server.url), timeout=10)
        try:
            for label, (statement, params) in statements.items():
                dialect = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]
                sql, args = statement_args(statement, dialect, params)
                plans[label] = [row[0] for row in await conn.fetch("EXPLAIN " + sql, *args)]
        finally:
            await conn.close()

    asyncio.run(postgres())
    return plans


def full_scans(plans: dict[str, list[str]]) -> list[str]:
    """Plan lines that read smtp_users whole (SQLite "SCAN smtp_users", PostgreSQL "Seq Scan on")."""
    return [
        f"{label}: {step.strip()}"
        for label, steps in plans.items()
        for step in steps
        if ("SCAN smtp_users" in step and "SEARCH" not in step) or "Seq Scan on smtp_users" in step
    ]


# --- memory and stalls ----------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for entry in Path(f"/proc/{pid}/status").read_text().splitlines():
        if entry.startswith("VmRSS:"):
            return int(entry.split()[1]) / 1024
    return 0.0


@dataclass
class Memory:
    idle_mb: float
    sessions_mb: float
    sessions: int


async def hold_sessions(server: Server, count: int) -> Memory:
    idle = rss_mb(server.pid)
    writers = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.smtp_port)
            writers.append(writer)
            await smtp_reply(reader)
            writer.write(b"EHLO idle.bench\r\n")
            await smtp_reply(reader)
        await asyncio.sleep(2)  # let the server settle (and a collection run) before reading RSS
        return Memory(idle_mb=idle, sessions_mb=rss_mb(server.pid), sessions=len(writers))
    finally:
        for writer in writers:
            writer.close()


def measure_memory(server: Server) -> Memory:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_SESSIONS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE_SESSIONS * 4), hard))
    return asyncio.run(hold_sessions(server, IDLE_SESSIONS))


@dataclass
class Stall:
    p50_without_ms: float
    p99_without_ms: float
    p50_with_ms: float
    p99_with_ms: float
    sent_without: int
    sent_with: int
    uploads: int
    errors: int

    @property
    def ratio(self) -> float:
        return self.p99_with_ms / self.p99_without_ms


def add_user(server: Server) -> tuple[str, str]:
    body = {**server.fill.writer.credentials(), "total_limit": MAX_LIMIT, "hourly_limit": MAX_LIMIT}
    answer = httpx.post(f"{server.api}/settings/addSmtp", json=body, timeout=30).json()
    return answer["smtp_user_name"], answer["smtp_password"]


def load_command(
    server: Server, user: tuple[str, str], size: int, sessions: int, duration: float
) -> list[str]:
    return [sys.executable, str(BENCH_DIR / "smtp_load.py"), "--port", str(server.smtp_port),
            "--user", user[0], "--password", user[1], "--mode", "reused", "--size", str(size),
            "--sessions", str(sessions), "--duration", str(duration)]  # fmt: skip


def run_load(command: list[str], timeout: float) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_environment())
    found = [entry for entry in done.stdout.splitlines() if entry.startswith("RESULT ")]
    if not found:
        raise RuntimeError(f"smtp_load.py printed no RESULT: {done.stderr[-500:]}")
    result: dict[str, Any] = json.loads(found[0].removeprefix("RESULT "))
    return result


def measure_stall(server: Server, duration: float) -> Stall:
    small, big = add_user(server), add_user(server)
    without = run_load(load_command(server, small, 1024, STALL_SESSIONS, duration), duration + 120)
    # The uploader starts first and runs longer, so the whole window has a 25 MiB message arriving.
    uploader = subprocess.Popen(
        load_command(server, big, BIG_MESSAGE, 1, duration + 4), stdout=subprocess.PIPE, text=True,
        env=child_environment(),
    )  # fmt: skip
    try:
        time.sleep(2)
        with_big = run_load(load_command(server, small, 1024, STALL_SESSIONS, duration), duration + 120)
        out, _ = uploader.communicate(timeout=300)
    finally:
        if uploader.poll() is None:
            uploader.kill()
            uploader.wait()
    uploaded = json.loads(
        next(e for e in out.splitlines() if e.startswith("RESULT ")).removeprefix("RESULT ")
    )
    errors = sum(sum(r["errors"].values()) for r in (without, with_big, uploaded))
    return Stall(without["p50_ms"], without["p99_ms"], with_big["p50_ms"], with_big["p99_ms"],
                 without["sent"], with_big["sent"], uploaded["sent"], errors)  # fmt: skip


# --- one store ------------------------------------------------------------------------------------


@dataclass
class StoreResult:
    kind: str
    fills: list[Fill]
    figures: list[Figure]
    big_list: BigList
    plans: dict[str, list[str]]
    memory: Memory
    stall: Stall  # the run of median ratio
    stalls: list[Stall]  # every run
    problems: list[str] = field(default_factory=list)


@contextlib.contextmanager
def cpu_lock(path: Path | None) -> Iterator[None]:
    """Hold ``path`` (flock) while measuring, so benchmarks sharing the machine take turns."""
    if path is None:
        yield
        return
    with path.open("a") as handle:
        print(f"waiting for the lock {path} ...", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bench_store(kind: str, args: argparse.Namespace, work: Path) -> StoreResult:
    label = "SQLite" if kind == SQLITE else "PostgreSQL"
    secret = secrets.token_bytes(16)
    sizes = [(size_label(SMALL), SMALL, False), (size_label(args.users), args.users, True)]
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        fills: list[Fill] = []
        for name, users, big in sizes:
            data_dir = work / f"{kind.split(':')[0]}-{users}"
            url = stack.enter_context(store(kind, data_dir))
            migrate(url, data_dir)
            print(f"{label}: filling a store with {users:,} SMTP users ...", flush=True)
            filled = fill(url, data_dir, users, secret, big=big)
            print(f"  {filled.seconds:.0f} s", flush=True)
            fills.append(filled)
            api_port, smtp_port = free_port(), free_port()
            log = work / f"{kind.split(':')[0]}-{users}.log"
            process = stack.enter_context(
                running(serve_command(url, data_dir, api_port, smtp_port), log,
                        lambda p=api_port, s=smtp_port: accepts(p) and greets(s))  # type: ignore[misc]
            )  # fmt: skip
            servers.append(Server(name, url, process.pid, api_port, smtp_port, filled, secret, log))
        large = servers[-1]
        plans = explain(large, work / f"{kind.split(':')[0]}-{args.users}")
        with cpu_lock(args.lock):
            print(f"{label}: measuring, {args.runs} runs x {args.duration} s ...", flush=True)
            figures = measure_all(servers, args.runs, args.duration)
            big_list = measure_big_list(large)
            print(f"  listSmtp, 10,000 users: {statistics.median(big_list.latencies_ms):.0f} ms", flush=True)
            memory = measure_memory(large)
            print(f"  RSS idle {memory.idle_mb:.0f} MB, with {memory.sessions} sessions "
                  f"{memory.sessions_mb:.0f} MB", flush=True)  # fmt: skip
            stalls = []
            for run in range(1, args.runs + 1):
                stalls.append(measure_stall(large, args.duration))
                print(f"  run {run}: 20 sessions p99 {stalls[-1].p99_without_ms:.1f} ms, with a 25 MiB "
                      f"upload {stalls[-1].p99_with_ms:.1f} ms", flush=True)  # fmt: skip
            stall = sorted(stalls, key=lambda s: s.ratio)[len(stalls) // 2]
    # The servers have stopped: their logs are complete.
    problems = [f"{label} {s.label} logged: {entry}" for s in servers for entry in server_errors(s.log)[:10]]
    problems += [
        f"{label} {f.server}, {f.operation}, run {f.run}: {f.errors} errors" for f in figures if f.errors
    ]
    problems += [f"{label}: full scan: {scan}" for scan in full_scans(plans)]
    if errors := sum(s.errors for s in stalls):
        problems.append(f"{label}: {errors} SMTP errors during the 25 MiB measurements")
    return StoreResult(kind, fills, figures, big_list, plans, memory, stall, stalls, problems)


# --- report -------------------------------------------------------------------------------------


@dataclass
class Row:
    target: str
    ours: float
    baseline: float
    unit: str
    goal: str
    met: bool

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("inf")


def median_figure(figures: list[Figure], operation: str, server: str) -> Figure:
    rows = [f for f in figures if f.operation == operation and f.server == server]
    return Figure(operation, server, 0, statistics.median(f.per_second for f in rows),
                  statistics.median(f.p50_ms for f in rows), statistics.median(f.p99_ms for f in rows),
                  sum(f.errors for f in rows))  # fmt: skip


def store_label(kind: str) -> str:
    return "SQLite" if kind == SQLITE else "PostgreSQL"


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def rows_of(result: StoreResult) -> tuple[list[Row], list[tuple[str, Figure, Figure]]]:
    """The summary rows of one store, and each operation's medians at the two sizes."""
    label = store_label(result.kind)
    small, large = size_label(SMALL), size_label(result.fills[-1].users)
    rows, pairs = [], []
    for operation in ("SMTP login", "addSmtp", "listSmtp, 10 users"):
        a = median_figure(result.figures, operation, small)
        b = median_figure(result.figures, operation, large)
        pairs.append((operation, a, b))
        ratio = b.cost_us / a.cost_us
        target = f"{label}: {operation}, cost at {large} / at 1k"
        rows.append(
            Row(target, b.cost_us, a.cost_us, "µs per operation", f"<= {RATIO_GOAL}", ratio <= RATIO_GOAL)
        )
    m, s = result.memory, result.stall
    target = f"{label}: RSS of serve with {m.sessions:,} idle SMTP sessions / idle"
    rows.append(
        Row(target, m.sessions_mb, m.idle_mb, "MB", f"<= {RSS_GOAL_MB} MB", m.sessions_mb <= RSS_GOAL_MB)
    )
    target = f"{label}: p99 of 20 sessions sending 1 KB, with a 25 MiB upload / without"
    stalled = s.p99_with_ms > STALL_GOAL * s.p99_without_ms
    rows.append(Row(target, s.p99_with_ms, s.p99_without_ms, "ms", f"<= {STALL_GOAL}x", not stalled))
    ten = median_figure(result.figures, "listSmtp, 10 users", large)
    target = f"{label}: listSmtp of a 10,000-user owner at {large} / 10 users' p50"
    big = result.big_list
    rows.append(Row(target, statistics.median(big.latencies_ms), ten.p50_ms, "ms", "answers, reported",
                    big.users == BIG_OWNER))  # fmt: skip
    return rows, pairs


def store_section(args: argparse.Namespace, result: StoreResult) -> str:
    label = store_label(result.kind)
    _, pairs = rows_of(result)
    large = size_label(result.fills[-1].users).split()[0]
    table = [
        f"| measurement | at 1k | at {large} | ratio (cost) | target | verdict |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for operation, a, b in pairs:
        ratio = b.cost_us / a.cost_us
        table.append(
            f"| {operation}: per second | {a.per_second:,.0f} | {b.per_second:,.0f} | {ratio:.2f}x"
            f" | <= {RATIO_GOAL}x | {met(ratio <= RATIO_GOAL)} |"
        )
        table.append(
            f"| {operation}: p50 / p99 (ms) | {a.p50_ms:.2f} / {a.p99_ms:.2f}"
            f" | {b.p50_ms:.2f} / {b.p99_ms:.2f} | {b.p50_ms / a.p50_ms:.2f}x (p50) | | |"
        )
    m, s, big = result.memory, result.stall, result.big_list
    extra = [
        "| measurement | without | with | target | verdict |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| RSS of `serve` (MB), {m.sessions:,} idle SMTP sessions (after EHLO) | {m.idle_mb:.0f}"
        f" | {m.sessions_mb:.0f} | <= {RSS_GOAL_MB} MB | {met(m.sessions_mb <= RSS_GOAL_MB)} |",
        f"| 20 sessions sending 1 KB, p50 (ms); with: a 25 MiB upload meanwhile | {s.p50_without_ms:.1f}"
        f" | {s.p50_with_ms:.1f} | reported | |",
        f"| 20 sessions sending 1 KB, p99 (ms); with: a 25 MiB upload meanwhile | {s.p99_without_ms:.1f}"
        f" | {s.p99_with_ms:.1f} | <= {STALL_GOAL}x without"
        f" | {met(s.p99_with_ms <= STALL_GOAL * s.p99_without_ms)} ({s.p99_with_ms / s.p99_without_ms:.1f}x)"
        " |",
        f"| messages the 20 sessions sent in {args.duration} s | {s.sent_without:,} | {s.sent_with:,} | | |",
    ]
    plans = "\n".join(
        f"- {name}:\n" + "\n".join(f"  - `{step.strip()}`" for step in steps)
        for name, steps in result.plans.items()
    )
    fills = ", ".join(f"{f.users:,} users in {f.seconds:.0f} s" for f in result.fills)
    runs = [
        "| run | store | operation | per second | p50 (ms) | p99 (ms) | errors |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for f in result.figures:
        runs.append(
            f"| {f.run} | {f.server} | {f.operation} | {f.per_second:,.0f} | {f.p50_ms:.2f} | {f.p99_ms:.2f}"
            f" | {f.errors} |"
        )
    explain_kind = "EXPLAIN QUERY PLAN" if label == "SQLite" else "EXPLAIN"
    nl = "\n"
    return f"""## {label}

Filled straight into the tables: {fills}.

{nl.join(table)}

{nl.join(extra)}

The 25 MiB measurement is the run of median ratio of {len(result.stalls)}: \
{", ".join(f"{r.p99_without_ms:.1f} -> {r.p99_with_ms:.1f} ms ({r.ratio:.2f}x)" for r in result.stalls)}. \
25 MiB messages received while it was measured: {s.uploads} (the server's default \
`--large-message-rate`, 32 MiB/s, paces them).

listSmtp of the owner with 10,000 users, at {result.fills[-1].users:,} users: median
{statistics.median(big.latencies_ms):,.0f} ms, max {max(big.latencies_ms):,.0f} ms over \
{len(big.latencies_ms)} calls one at a time; {big.bytes:,} bytes, {big.users:,} users.

Query plans at {result.fills[-1].users:,} users ({explain_kind}):

{plans}

### Every measurement

{nl.join(runs)}
"""


def render(
    args: argparse.Namespace, results: list[StoreResult], problems: list[str]
) -> tuple[str, list[Row]]:
    all_rows = [row for result in results for row in rows_of(result)[0]]
    summary = [
        "| target | ours | baseline | ratio | unit | goal | met |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in all_rows:
        summary.append(
            f"| {r.target} | {r.ours:,.1f} | {r.baseline:,.1f} | {r.ratio:.2f} | {r.unit} | {r.goal}"
            f" | {'yes' if r.met else '**no**'} |"
        )
    problems_text = "\n".join(f"- {p}" for p in problems) if problems else "None."
    nl = "\n"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = f"""# Scale benchmark

Made by `python bench/scale.py` (see its docstring); rerun it to refresh this file.

- Date: {now}
- Commit: {source_version()}
- Machine: `nproc` = {len(os.sched_getaffinity(0))}, {cpu_model()}; shared with other work, so every
  figure is a median of runs alternating the two stores
- Python: {platform.python_version()}
- Parameters: {args.runs} runs x {args.duration} s per measurement, alternating the store of 1,000 users and
  the one of {args.users:,}; SMTP login by {LOGIN_CLIENTS} clients at once (new connection, EHLO,
  AUTH PLAIN, QUIT); addSmtp and listSmtp by wrk, {WRK_CONNECTIONS} connections;
  `serve --roles api,smtp --max-connections-per-address {IDLE_SESSIONS + 100}`
- Cost = time per operation at full load (1 / throughput); ratio = cost at {args.users:,} users / at 1,000.

## Summary

{nl.join(summary)}

## Failures

{problems_text}

"""
    return report + "\n".join(store_section(args, result) for result in results), all_rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url", action="append", dest="stores", default=None,
        help="postgresql://USER@HOST:PORT/DB: a store besides SQLite (repeatable)",
    )  # fmt: skip
    parser.add_argument("--users", type=int, default=1_000_000, help="SMTP users of the large store")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=6, help="seconds per measurement (default 6)")
    parser.add_argument("--lock", type=Path, default=None, help="flock this file while measuring")
    parser.add_argument("--report", type=Path, default=REPORT_PATH)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 20,000 users, 1 run of 2 s")
    args = parser.parse_args()
    # SQLite always; each --database-url adds a store (bench/run.py passes its PostgreSQL).
    args.stores = [SQLITE, *(url for url in args.stores or [] if url != SQLITE)]
    if args.quick:
        args.users, args.runs, args.duration = 20_000, 1, 2
    if args.users < BIG_OWNER + 100:
        parser.error(f"--users must be at least {BIG_OWNER + 100}")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if shutil.which("wrk") is None:
        print(
            "bench/scale.py: wrk is not installed; install it with: apt-get install -y wrk", file=sys.stderr
        )
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="poweremail-scale-") as tmp:
        for kind in args.stores:
            results.append(bench_store(kind, args, Path(tmp)))
    problems = [p for r in results for p in r.problems]
    report, rows = render(args, results, problems)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    summary = [
        {"target": r.target, "ours": round(r.ours, 3), "baseline": round(r.baseline, 3),
         "ratio": round(r.ratio, 3), "unit": r.unit, "goal": r.goal, "met": r.met}
        for r in rows
    ]  # fmt: skip
    args.report.with_suffix(".json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(report.split("## Failures")[0])
    for problem in problems:
        print(f"FAILURE: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench/scale.py: interrupted", file=sys.stderr)
        sys.exit(130)
