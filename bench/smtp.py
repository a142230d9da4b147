"""Benchmark of SMTP submission: PowerEmail's durable, limit-checked acceptance against a bare aiosmtpd.

    python bench/smtp.py [--runs 3] [--duration 8] [--sessions 20] [--database-url URL ...]
                         [--shared-smtp-user] [--quiet-wait SECONDS] [--profile] [--workers N]
                         [--deliver [--delivery-workers M]]

Starts bench/bare_smtp.py (aiosmtpd on the same event-loop setup, AUTH PLAIN checked in memory, every
message discarded with 250) and ``poweremail serve --roles api,smtp`` (a fresh store: SQLite in a
temporary directory by default), then loads both with bench/smtp_load.py, a minimal asyncio SMTP
client in a separate process: ``--sessions`` sessions, each message with one recipient, 1 KB or
100 KB, either on reused logged-in connections or with a new connection + EHLO + AUTH per message.
Within every run the targets alternate (bare, PowerEmail, bare, PowerEmail, ...), so drift of the
machine touches both sides alike; medians over the runs and the ratio PowerEmail/bare go to the
terminal and to docs/benchmarks/smtp.md (and a summary to smtp.json, for bench/run.py). The target
(issue 5): PowerEmail at >= 0.8x the bare server's messages/s for 1 KB, on reused connections and
with a new connection per message; ``--deliver`` measures it as issue 5 asks, with PowerEmail's
delivery worker relaying everything it accepts to a local smtp-sink meanwhile.

Every PowerEmail measurement logs in as a new SMTP user (largest limits), so each starts with an empty
rolling hour and none depends on what the measurements before it sent. ``--shared-smtp-user`` sends
everything as one user instead, whose history then grows run after run: if the rate depended on a
user's recent volume, the runs (and the per-second columns of the report) would show it fall.

Only 2xx replies to the final dot count as sent; every other reply, refused or dropped connection and
timeout is an error, reported, never dropped. After the runs PowerEmail's ``sent_total`` (listSmtp)
must equal the 2xx replies counted, user by user. Exits 1 on any error, mismatch or server error log.

``--database-url postgresql://USER@HOST:PORT/DB`` runs PowerEmail on PostgreSQL instead: a fresh
database ``poweremail_bench_<random>`` on that server (created with asyncpg, dropped afterwards; the
named database is only used to connect). Repeat the option (``sqlite`` names the default) to measure
several stores in one go. On a shared machine, ``--quiet-wait 60`` waits (up to a minute) before
each measurement until other processes leave the machine idle; every measurement also reports the
CPU others used meanwhile, and flags it when that was over a quarter of a core. ``--profile`` adds
one uncounted reused 1 KB run per store under py-spy (``pip install py-spy``) and summarises where
PowerEmail's event loop spends its time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from _machine import child_pids, cpu_model, machine_cpu, own_cpu, process_cpu
from _receiver import SMTP_SINK_SETUP, Receiver, find_smtp_sink, install_smtp_sink
from _servers import (  # bench/ is on sys.path: scripts run as python bench/X.py
    BARE_PASSWORD,
    BARE_SCRIPT,
    BARE_USER,
    STOP_TIMEOUT_S,
    child_environment,
    free_port,
    running,
    stop_process,
)
from sqlalchemy import make_url

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LOAD_SCRIPT = BENCH_DIR / "smtp_load.py"
REPORT_PATH = REPO_ROOT / "docs" / "benchmarks" / "smtp.md"

BARE = "bare"
POWEREMAIL = "PowerEmail"
MODES = ("reused", "new")  # reused logged-in connections; a new connection + EHLO + AUTH per message
MODE_NAMES = {"reused": "reused connection", "new": "new connection per message"}
SIZES = {"1 KB": 1024, "100 KB": 100 * 1024}
# Issue 5, target 1: >= 0.8x the bare server, 1 KB, on reused connections and on a new one per message.
GOALS = (("reused", "1 KB"), ("new", "1 KB"))
TARGET_RATIO = 0.8
SQLITE = "sqlite"
# The largest limits addSmtp accepts: the benchmark must never be refused for limits.
MAX_LIMIT = 2_147_483_647
# A measurement during which other processes kept this much of a core busy is flagged as noisy.
NOISY_OTHER_CORES = 0.25
# A client process this busy may itself be the bottleneck: its figures understate the server.
SATURATED_CLIENT_CORES = 0.9
GO_DELAY_S = 0.05  # between telling the clients the start time and that time
WARMUP, PROFILED = 0, -1  # Measurement.run of the uncounted measurements
# Generic frames every stack shares; the profile summary leaves them out of the inclusive ranking.
PROFILE_SKIP = ("runpy", "asyncio/runners.py", "asyncio/base_events.py", "poweremail/__main__.py",
                "poweremail/cli.py", "asyncio/events.py", "threading.py")  # fmt: skip


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


@dataclass
class Target:
    """A server under load: where it listens, which process to watch, how to log in."""

    name: str
    port: int
    pid: int
    login: Callable[[], Credentials]  # called once per measurement
    database_name: str | None = None  # PostgreSQL: its backends' CPU is the server's too
    receiver_pid: int | None = None  # --deliver: smtp-sink, whose CPU is nobody else's either


@dataclass(frozen=True)
class Measurement:
    store: str
    run: int  # 1, 2, ...; WARMUP and PROFILED are not counted
    target: str
    mode: str
    size: str
    user: str
    sent: int
    errors: dict[str, int]
    elapsed: float
    p50_ms: float
    p99_ms: float
    per_second: list[int]
    server_cores: float  # the server process, all its threads
    database_cores: float  # PostgreSQL backends serving the server (0 on SQLite and for bare)
    client_cores: float  # the load generator process(es)
    client_processes: int
    other_cores: float  # anything else on the machine: noise
    steal_cores: float  # CPU the hypervisor gave to other machines: noise we cannot stop
    worker_cores: tuple[float, ...] = ()  # --workers N: each worker process (in server_cores too)

    @property
    def counted(self) -> bool:
        return self.run > 0

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def noisy(self) -> bool:
        return self.other_cores > NOISY_OTHER_CORES

    @property
    def client_saturated(self) -> bool:
        return self.client_cores > SATURATED_CLIENT_CORES * self.client_processes


@dataclass(frozen=True)
class Row:
    """One (store, mode, size): medians over the runs."""

    store: str
    mode: str
    size: str
    bare_rate: float
    poweremail_rate: float
    bare_cores: float
    poweremail_cores: float  # PowerEmail's process plus, on PostgreSQL, its database backends
    p50_ms: float
    p99_ms: float
    errors: int  # both targets, all runs

    @property
    def ratio(self) -> float:
        return self.poweremail_rate / self.bare_rate if self.bare_rate else 0.0


@dataclass
class Outcome:
    """Everything one benchmark produced, for the terminal and the report."""

    measurements: list[Measurement] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # sent_total checks that passed
    problems: list[str] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)  # store -> summary (markdown)


# --- processes --------------------------------------------------------------------------------


def poweremail_command(*args: str) -> list[str]:
    # `python -m poweremail`, not the script on PATH: the same interpreter as the bare server.
    return [sys.executable, "-m", "poweremail", *args]


def serve_command(
    data_dir: Path,
    database_url: str,
    *,
    api_port: int,
    smtp_port: int,
    smtps_port: int,
    receiver: Receiver | None,
    extra: list[str],
) -> list[str]:
    """``poweremail serve`` as the benchmarks run it: the per-address connection limit out of the
    way, warnings only in the log; with ``receiver``, delivery runs beside acceptance and relays
    everything there."""
    roles = "api,smtp,delivery" if receiver is not None else "api,smtp"
    command = poweremail_command(
        "serve", "--data-dir", str(data_dir), "--database-url", database_url, "--roles", roles,
        "--api-port", str(api_port), "--smtp-port", str(smtp_port), "--smtps-port", str(smtps_port),
        "--max-connections-per-address", "1000", "--log-level", "WARNING", *extra,
    )  # fmt: skip
    if receiver is not None:
        command += ["--relay", f"127.0.0.1:{receiver.port}", "--relay-tls", "none", *receiver.relay_login]
    return command


def greets(port: int) -> bool:
    """A 220 greeting: PowerEmail binds its ports before the store is open, so a connect is not enough."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(4).startswith(b"220")
    except OSError:
        return False


def server_errors(log_path: Path) -> list[str]:
    """Lines where a server logged an error or a traceback: any of them spoils the figures."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]


# --- PowerEmail's store and API ---------------------------------------------------------------


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.contextmanager
def store_url(store: str, data_dir: Path) -> Iterator[tuple[str, str | None]]:
    """(database URL, PostgreSQL database name or None) for ``store``; a PostgreSQL database is
    created fresh, so the benchmark starts empty and never writes into someone's data, and dropped
    after, whatever happens."""
    if store == SQLITE:
        yield f"sqlite:///{(data_dir / 'poweremail.sqlite3').resolve()}", None
        return
    name = f"poweremail_bench_{secrets.token_hex(6)}"
    asyncio.run(create_database(store, name))
    try:
        yield make_url(store).set(database=name).render_as_string(hide_password=False), name
    finally:
        asyncio.run(drop_database(store, name))


def create_owner(data_dir: Path, database_url: str) -> dict[str, str]:
    command = poweremail_command(
        "owner", "create", "--data-dir", str(data_dir), "--database-url", database_url, "--name", "bench"
    )
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment())
    if done.returncode != 0:
        raise RuntimeError(f"poweremail owner create exited with {done.returncode}: {done.stderr.strip()}")
    created = json.loads(done.stdout)
    return {"owner_id": created["owner_id"], "token": created["token"]}


class PowerEmailApi:
    """The two management calls the benchmark needs: addSmtp before a measurement, listSmtp after."""

    def __init__(self, port: int, owner: dict[str, str]) -> None:
        self._client = httpx.Client(base_url=f"http://127.0.0.1:{port}/settings", timeout=60)
        self._owner = owner

    def add_smtp_user(self) -> Credentials:
        body = {**self._owner, "total_limit": MAX_LIMIT, "hourly_limit": MAX_LIMIT}
        answer = self._client.post("/addSmtp", json=body)
        if answer.status_code != 200:
            raise RuntimeError(f"addSmtp answered {answer.status_code}: {answer.text[:300]}")
        created = answer.json()
        return Credentials(created["smtp_user_name"], created["smtp_password"])

    def sent_totals(self) -> dict[str, int]:
        answer = self._client.post("/listSmtp", json=self._owner)
        if answer.status_code != 200:
            raise RuntimeError(f"listSmtp answered {answer.status_code}: {answer.text[:300]}")
        return {user["smtp_user_name"]: int(user["sent_total"]) for user in answer.json()["smtp_list"]}

    def close(self) -> None:
        self._client.close()


def api_answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --- CPU accounting ---------------------------------------------------------------------------


def backend_pids(database_name: str | None) -> list[int]:
    """PostgreSQL backends connected to ``database_name``: their title names the database."""
    if database_name is None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if f" {database_name} ".encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: the machine's processes, the server, its database backends, this script
    with its waited children (the load generators once they end), and steal."""

    machine: float
    server: float
    database: dict[int, float]
    ours: float
    steal: float
    receiver: float

    workers: dict[int, float] = field(default_factory=dict)  # --workers N: each worker process

    @classmethod
    def take(cls, target: Target) -> CpuSnapshot:
        machine, steal = machine_cpu()
        workers = {pid: process_cpu(pid) for pid in child_pids(target.pid)}
        return cls(
            machine=machine,
            server=process_cpu(target.pid) + sum(workers.values()),
            workers=workers,
            database={pid: process_cpu(pid) for pid in backend_pids(target.database_name)},
            ours=own_cpu(),
            steal=steal,
            receiver=process_cpu(target.receiver_pid) if target.receiver_pid else 0.0,
        )

    def database_since(self, before: CpuSnapshot) -> float:
        # A backend that started during the measurement counts from zero; one that ended is lost.
        return sum(cpu - before.database.get(pid, 0.0) for pid, cpu in self.database.items())


# --- load -------------------------------------------------------------------------------------


def machine_busy_cores(seconds: float) -> float:
    """Cores the machine's processes kept busy over ``seconds`` (user + nice + system)."""

    before, _ = machine_cpu()
    time.sleep(seconds)
    return (machine_cpu()[0] - before) / seconds


def wait_for_quiet(max_wait: float) -> None:
    """Between measurements our servers idle, so whatever keeps the machine busy is someone else:
    wait up to ``max_wait`` seconds for it to stop (a shared machine), then measure regardless."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline and machine_busy_cores(0.5) > NOISY_OTHER_CORES:
        pass


def load_command(target: Target, credentials: Credentials, load: Load, sessions: int) -> list[str]:
    return [
        sys.executable, str(LOAD_SCRIPT), "--port", str(target.port),
        "--user", credentials.user, "--password", credentials.password,
        "--mode", load.mode, "--size", str(SIZES[load.size]), "--sessions", str(sessions),
        "--duration", str(load.duration), "--wait-for-go",
    ]  # fmt: skip


def split_sessions(sessions: int, processes: int) -> list[int]:
    share, extra = divmod(sessions, processes)  # parse_args ensures processes <= sessions
    return [share + (1 if i < extra else 0) for i in range(processes)]


def start_clients(commands: list[list[str]]) -> list[subprocess.Popen[str]]:
    clients: list[subprocess.Popen[str]] = []
    try:
        for command in commands:
            clients.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=REPO_ROOT,
                    start_new_session=True,
                )
            )
        for client in clients:  # each prints READY once its sessions are logged in
            assert client.stdout is not None
            if client.stdout.readline().strip() != "READY":
                _, stderr = client.communicate(timeout=STOP_TIMEOUT_S)
                raise RuntimeError(f"load generator failed before starting:\n{stderr}")
    except BaseException:
        stop_clients(clients)
        raise
    return clients


def stop_clients(clients: list[subprocess.Popen[str]]) -> None:
    for client in clients:
        if client.poll() is None:
            client.kill()
        client.wait()


def collect(clients: list[subprocess.Popen[str]], timeout: float) -> list[dict[str, Any]]:
    results = []
    for client in clients:
        stdout, stderr = client.communicate(timeout=timeout)
        line = next((line for line in stdout.splitlines() if line.startswith("RESULT ")), None)
        if client.returncode != 0 or line is None:
            raise RuntimeError(f"load generator exited with {client.returncode}:\n{stderr}")
        results.append(json.loads(line.removeprefix("RESULT ")))
    return results


@dataclass(frozen=True)
class Load:
    mode: str
    size: str
    sessions: int
    duration: float
    processes: int


def run_load(
    target: Target, load: Load, *, store: str, run: int, during: Callable[[], None] | None = None
) -> Measurement:
    """One measurement: log in, start every client on one clock, wait, add up what they counted.

    ``during`` runs once the clock has started (the profiler attaches there).
    """
    credentials = target.login()
    commands = [
        load_command(target, credentials, load, share)
        for share in split_sessions(load.sessions, load.processes)
    ]
    clients = start_clients(commands)
    try:
        start_at = time.time() + GO_DELAY_S
        for client in clients:
            assert client.stdin is not None
            client.stdin.write(f"GO {start_at}\n")
            client.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        before, started = CpuSnapshot.take(target), time.monotonic()
        if during is not None:
            during()
        # Each reply has its own 60 s timeout in the client; this only stops a wedged benchmark.
        results = collect(clients, timeout=load.duration + 180)
        after, window = CpuSnapshot.take(target), time.monotonic() - started
    finally:
        stop_clients(clients)
    return measurement_from(target, load, store, run, credentials, results, before, after, window)


def measurement_from(
    target: Target,
    load: Load,
    store: str,
    run: int,
    credentials: Credentials,
    results: list[dict[str, Any]],
    before: CpuSnapshot,
    after: CpuSnapshot,
    window: float,
) -> Measurement:
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
    seconds = range(max(len(r["per_second"]) for r in results))
    server = after.server - before.server
    database = after.database_since(before)
    ours = after.ours - before.ours
    receiver = after.receiver - before.receiver
    return Measurement(
        store=store,
        run=run,
        target=target.name,
        mode=load.mode,
        size=load.size,
        user=credentials.user,
        sent=sum(r["sent"] for r in results),
        errors=dict(errors),
        elapsed=max(r["elapsed"] for r in results),
        # Several client processes: the worst of their percentiles (each is exact for its sessions).
        p50_ms=max(r["p50_ms"] for r in results),
        p99_ms=max(r["p99_ms"] for r in results),
        per_second=[sum(r["per_second"][i] for r in results if i < len(r["per_second"])) for i in seconds],
        server_cores=server / window,
        database_cores=database / window,
        client_cores=sum(r["cpu_seconds"] for r in results) / window,
        client_processes=len(results),
        other_cores=max(0.0, (after.machine - before.machine) - server - database - ours - receiver) / window,
        steal_cores=(after.steal - before.steal) / window,
        worker_cores=tuple(
            sorted(((cpu - before.workers.get(pid, 0.0)) / window for pid, cpu in after.workers.items()),
                   reverse=True)
        ),
    )  # fmt: skip


def progress_line(m: Measurement) -> str:
    flags = "".join(
        [
            f"  ERRORS {m.errors}" if m.errors else "",
            "  (noisy)" if m.noisy else "",
            "  (client saturated)" if m.client_saturated else "",
        ]
    )
    database = f" + db {m.database_cores:.2f}" if m.database_cores else ""
    workers = f" ({' / '.join(f'{c:.2f}' for c in m.worker_cores)})" if m.worker_cores else ""
    return (
        f"{m.target:<10} {m.mode:<6} {m.size:>6}  {m.rate:8.1f} msg/s  p50 {m.p50_ms:7.1f} ms"
        f"  p99 {m.p99_ms:7.1f} ms  server CPU {m.server_cores:.2f}{workers}{database}"
        f"  client CPU {m.client_cores:.2f}  other {m.other_cores:.2f}{flags}"
    )


def measure(targets: tuple[Target, Target], args: argparse.Namespace, store: str) -> list[Measurement]:
    """Warm-up, then ``args.runs`` runs, each measuring every (mode, size) on bare, then PowerEmail."""
    results: list[Measurement] = []
    combinations = [(mode, size) for mode in MODES for size in SIZES]
    wait_for_quiet(args.quiet_wait)
    for mode, size in combinations:
        # Not reported, but counted in the sent_total check: warms SQLite's page cache, the pools,
        # the CPU frequency, and creates the tables' first pages.
        for target in targets:
            load = Load(mode, size, args.sessions, args.warmup, args.client_processes)
            results.append(run_load(target, load, store=store, run=WARMUP))
    for run in range(1, args.runs + 1):
        for mode, size in combinations:
            for target in targets:
                wait_for_quiet(args.quiet_wait)
                load = Load(mode, size, args.sessions, args.duration, args.client_processes)
                result = run_load(target, load, store=store, run=run)
                print(f"  {store_label(store)} run {run}/{args.runs}  {progress_line(result)}", flush=True)
                results.append(result)
    return results


# --- profile ----------------------------------------------------------------------------------


def profile_run(target: Target, args: argparse.Namespace, store: str, work: Path) -> tuple[Measurement, str]:
    """One uncounted reused 1 KB run of PowerEmail under py-spy; the measurement and a summary.

    ``--gil`` samples only the thread holding the GIL: where PowerEmail's Python code (the event
    loop and the store's worker threads) spends CPU. Samples at 100 Hz, so the share of the expected
    samples that were taken says roughly how busy the GIL was.
    """
    seconds = max(2, int(args.profile_seconds))
    raw = work / f"profile-{secrets.token_hex(4)}.txt"
    command = [py_spy(), "record", "--pid", str(target.pid), "--duration", str(seconds), "--rate", "100",
               "--gil", "--nonblocking", "--format", "raw", "--output", str(raw)]  # fmt: skip
    spy: list[subprocess.Popen[bytes]] = []
    threads_before: dict[int, tuple[float, float]] = {}

    def attach() -> None:
        threads_before.update(thread_cpu(target.pid))
        spy.append(
            subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
            )
        )

    load = Load("reused", "1 KB", args.sessions, seconds + 1.0, args.client_processes)
    try:
        measurement = run_load(target, load, store=store, run=PROFILED, during=attach)
        threads_after = thread_cpu(target.pid)
        _, stderr = spy[0].communicate(timeout=30)
    finally:
        for process in spy:
            stop_process(process)
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote no profile: {stderr.decode(errors='replace').strip()}")
    threads = summarize_threads(target.pid, threads_before, threads_after, measurement)
    return measurement, f"{threads}\n\n{summarize_profile(raw, expected_samples=100 * seconds)}"


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each thread of ``pid``; the main thread's id is ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread may end while we look
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            threads[int(task.name)] = (int(stat[11]) / ticks, int(stat[12]) / ticks)
    return threads


def summarize_threads(
    pid: int,
    before: dict[int, tuple[float, float]],
    after: dict[int, tuple[float, float]],
    measurement: Measurement,
) -> str:
    """Where the process's CPU went by thread: py-spy --gil sees only Python code holding the GIL,
    not system calls or the C code of SQLite that runs without it."""

    def spent(tid: int) -> tuple[float, float]:
        user, system = after[tid]
        user_before, system_before = before.get(tid, (0.0, 0.0))
        return user - user_before, system - system_before

    seconds = measurement.elapsed
    loop_user, loop_system = spent(pid) if pid in after else (0.0, 0.0)
    others = [spent(tid) for tid in after if tid != pid]
    other_cpu = sum(user + system for user, system in others)
    loop = loop_user + loop_system
    total = loop + other_cpu
    per_message = f"{1000 * total / measurement.sent:.1f} ms" if measurement.sent else "-"
    return (
        f"During the profiled run ({measurement.rate:,.0f} msg/s) the server used {total / seconds:.2f}"
        f" cores, {per_message} of CPU per message: its event-loop thread {loop / seconds:.2f}"
        f" ({loop_user / seconds:.2f} user, {loop_system / seconds:.2f} system), its {len(others)} other"
        f" thread(s) {other_cpu / seconds:.2f}."
    )


def summarize_profile(raw: Path, *, expected_samples: int, top: int = 12) -> str:
    """Markdown: the functions that hold the GIL most, by own time and with their callees."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        frames = [frame for frame in stack.split(";") if frame.strip()]
        total += samples
        if frames:
            own[frames[-1]] += samples
        for frame in set(frames):
            if not any(skip in frame for skip in PROFILE_SKIP):
                inclusive[frame] += samples
    if not total:
        return "py-spy took no samples."

    def ranking(counter: Counter[str]) -> str:
        return "\n".join(f"| {n / total:.1%} | `{frame}` |" for frame, n in counter.most_common(top))

    return (
        f"{total} samples with the GIL held, {total / expected_samples:.0%} of the {expected_samples} a"
        f" fully busy GIL would give.\n\nOwn time (the frame at the top of the stack):\n\n"
        f"| share | function (file:line) |\n| ---: | --- |\n{ranking(own)}\n\n"
        f"With callees (leaving out the event loop and entry frames every stack has):\n\n"
        f"| share | function (file:line) |\n| ---: | --- |\n{ranking(inclusive)}"
    )


# --- one store --------------------------------------------------------------------------------


def store_label(store: str) -> str:
    return "SQLite" if store == SQLITE else "PostgreSQL"


def check_sent_totals(
    api: PowerEmailApi, measurements: list[Measurement], store: str, outcome: Outcome
) -> None:
    """PowerEmail's sent_total per SMTP user must equal the 2xx replies the clients counted."""
    counted: Counter[str] = Counter()
    for m in measurements:
        if m.target == POWEREMAIL:
            counted[m.user] += m.sent
    stored = api.sent_totals()
    wrong = {user: (n, stored.get(user)) for user, n in counted.items() if stored.get(user) != n}
    line = (
        f"{store_label(store)}: sent_total over {len(counted)} SMTP users = {sum(stored.values()):,};"
        f" 2xx replies counted = {sum(counted.values()):,}"
    )
    if wrong:
        detail = ", ".join(f"{user}: counted {n}, sent_total {s}" for user, (n, s) in wrong.items())
        outcome.problems.append(f"sent_total MISMATCH: {line} ({detail})")
    else:
        outcome.checks.append(f"{line}: equal")


def bench_store(store: str, args: argparse.Namespace, work: Path, bare: Target, outcome: Outcome) -> None:
    """Start PowerEmail on ``store``, measure it against ``bare``, check it, stop it."""
    data_dir = work / f"poweremail-{len(outcome.profiles) + len(outcome.checks) + len(outcome.problems)}"
    log_path = data_dir.with_suffix(".log")
    with store_url(store, data_dir) as (database_url, database_name):
        owner = create_owner(data_dir, database_url)
        api_port, smtp_port, smtps_port = free_port(), free_port(), free_port()
        extra = ["--workers", str(args.workers)]
        if args.delivery_workers:
            extra += ["--delivery-workers", str(args.delivery_workers)]
        serve = serve_command(
            data_dir, database_url, api_port=api_port, smtp_port=smtp_port, smtps_port=smtps_port,
            receiver=args.receiver, extra=extra,
        )  # fmt: skip

        def ready() -> bool:
            return greets(smtp_port) and api_answers(api_port)

        with running(serve, log_path, ready) as server:
            pid = server.pid
            api = PowerEmailApi(api_port, owner)
            try:
                shared = api.add_smtp_user() if args.shared_smtp_user else None

                def login() -> Credentials:
                    return shared if shared is not None else api.add_smtp_user()

                receiver_pid = args.receiver.pid if args.receiver is not None else None
                poweremail = Target(POWEREMAIL, smtp_port, pid, login, database_name, receiver_pid)
                measurements = measure((bare, poweremail), args, store)
                if args.profile:
                    print(f"  {store_label(store)}: profiling PowerEmail (reused, 1 KB) with py-spy ...")
                    profiled, outcome.profiles[store] = profile_run(poweremail, args, store, work)
                    measurements.append(profiled)
                check_sent_totals(api, measurements, store, outcome)
            finally:
                api.close()
        outcome.measurements += measurements
        outcome.problems += [
            f"PowerEmail ({store_label(store)}) logged: {line}" for line in server_errors(log_path)[:20]
        ]


# --- summary and report -----------------------------------------------------------------------


def summarize(measurements: list[Measurement], stores: list[str]) -> list[Row]:
    """Medians over the counted runs; the ratio is of PowerEmail's median to the bare median."""
    rows = []
    for store in stores:
        for mode in MODES:
            for size in SIZES:
                same = [m for m in measurements if (m.store, m.mode, m.size) == (store, mode, size)]
                bare = [m for m in same if m.target == BARE and m.counted]
                ours = [m for m in same if m.target == POWEREMAIL and m.counted]
                if not bare or not ours:
                    continue
                rows.append(
                    Row(
                        store=store,
                        mode=mode,
                        size=size,
                        bare_rate=statistics.median(m.rate for m in bare),
                        poweremail_rate=statistics.median(m.rate for m in ours),
                        bare_cores=statistics.median(m.server_cores for m in bare),
                        poweremail_cores=statistics.median(m.server_cores + m.database_cores for m in ours),
                        p50_ms=statistics.median(m.p50_ms for m in ours),
                        p99_ms=statistics.median(m.p99_ms for m in ours),
                        errors=sum(m.error_count for m in same),
                    )
                )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| store | mode | size | bare msg/s | PowerEmail msg/s | ratio | bare CPU | PowerEmail CPU"
        " | PowerEmail p50 / p99 (ms) | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        errors = f"**{r.errors}**" if r.errors else "0"
        lines.append(
            f"| {store_label(r.store)} | {MODE_NAMES[r.mode]} | {r.size} | {r.bare_rate:,.0f}"
            f" | {r.poweremail_rate:,.0f} | {r.ratio:.2f}x | {r.bare_cores:.2f} | {r.poweremail_cores:.2f}"
            f" | {r.p50_ms:,.0f} / {r.p99_ms:,.0f} | {errors} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        if (r.mode, r.size) not in GOALS:
            continue
        met = "**met**" if r.ratio >= TARGET_RATIO else "**not met**"
        mode = "reused connections" if r.mode == "reused" else "a new connection + AUTH per message"
        lines.append(
            f"Target ({store_label(r.store)}: durable, limit-checked acceptance at >= {TARGET_RATIO}x"
            f" the bare server's rate on {mode}, 1 KB): {met}, at {r.ratio:.2f}x"
            f" ({r.poweremail_rate:,.0f} vs {r.bare_rate:,.0f} messages/s)."
        )
    return lines


def summary_rows(rows: list[Row], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The figures bench/run.py puts in its one table (docs/benchmarks/smtp.json)."""
    setup = (
        "with delivery" if args.deliver else "no delivery"
    ) + f", {getattr(args, 'workers', 1) + getattr(args, 'delivery_workers', 0)} process(es)"
    return [
        {
            "target": f"SMTP acceptance, {store_label(r.store)}, {r.mode} connection, {r.size} ({setup})",
            "ours": round(r.poweremail_rate, 1),
            "baseline": round(r.bare_rate, 1),
            "ratio": round(r.ratio, 3),
            "unit": "msg/s (baseline: bare aiosmtpd, discarding)",
            "goal": f">= {TARGET_RATIO}x" if (r.mode, r.size) in GOALS else "reported",
            "met": r.ratio >= TARGET_RATIO if (r.mode, r.size) in GOALS else None,
            "p99_ms": round(r.p99_ms, 1),
        }
        for r in rows
    ]


def runs_table(measurements: list[Measurement]) -> str:
    lines = [
        "| store | run | target | mode | size | sent | msg/s | first s / last s | p50 / p99 (ms)"
        " | server CPU | client CPU | other CPU | steal | errors |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in measurements:
        full = m.per_second[: int(m.elapsed)]  # whole seconds only: the last is partial
        timeline = f"{full[0]:,} / {full[-1]:,}" if len(full) >= 2 else "-"
        server = f"{m.server_cores:.2f}" + (f" + db {m.database_cores:.2f}" if m.database_cores else "")
        other = f"**{m.other_cores:.2f}**" if m.noisy else f"{m.other_cores:.2f}"
        errors = "; ".join(f"{n} x {e}" for e, n in m.errors.items()) or "0"
        run = {WARMUP: "warm-up", PROFILED: "profiled"}.get(m.run, str(m.run))
        lines.append(
            f"| {store_label(m.store)} | {run} | {m.target} | {m.mode} | {m.size} | {m.sent:,}"
            f" | {m.rate:,.1f} | {timeline} | {m.p50_ms:,.1f} / {m.p99_ms:,.1f} | {server}"
            f" | {m.client_cores:.2f} | {other} | {m.steal_cores:.2f} | {errors} |"
        )
    return "\n".join(lines)


def noise_note(measurements: list[Measurement]) -> str:
    counted = [m for m in measurements if m.counted]
    noisy = [m for m in counted if m.noisy]
    saturated = [m for m in counted if m.client_saturated]
    note = (
        f"**{len(noisy)} of {len(counted)} counted measurements saw other processes use more than"
        f" {NOISY_OTHER_CORES} of a core** (bold below): their figures are lower than a quiet machine's."
        if noisy
        else f"No counted measurement saw other processes use more than {NOISY_OTHER_CORES} of a core."
    )
    if saturated:
        note += (
            f" In {len(saturated)} of them the load generator used over {SATURATED_CLIENT_CORES} of a"
            " core per process, so it may have been the bottleneck: those rates understate the server."
        )
    return note


def versions() -> str:
    packages = [
        f"{name} {importlib.metadata.version(name)}" for name in ("aiosmtpd", "sqlalchemy", "asyncpg")
    ]
    # Whatever driver PowerEmail puts on top, SQLite itself is the library Python's sqlite3 links.
    return ", ".join([*packages, f"SQLite {sqlite3.sqlite_version} (Python's sqlite3)"])


def postgres_version(stores: list[str]) -> str:
    servers = [s for s in stores if s != SQLITE]
    if not servers:
        return ""

    async def version() -> str:
        conn = await asyncpg.connect(asyncpg_dsn(servers[0]), timeout=10)
        try:
            return str(await conn.fetchval("SHOW server_version")).split()[0]
        finally:
            await conn.close()

    return f"; PostgreSQL {asyncio.run(version())} on the same machine"


def stores_text(stores: list[str]) -> str:
    parts = []
    for store in stores:
        if store == SQLITE:
            parts.append("SQLite (the default store) in a temporary directory on the machine's disk")
        else:
            server = make_url(store).set(database="").render_as_string(hide_password=True)
            parts.append(f"PostgreSQL, a fresh database `{server}poweremail_bench_<random>`")
    return "; ".join(parts)


def render_report(
    args: argparse.Namespace, rows: list[Row], outcome: Outcome, pg_version: str, version: str
) -> str:
    problems = "\n".join(f"- {p}" for p in outcome.problems) or "None."
    checks = "\n".join(f"- {c}" for c in outcome.checks) or "- (no check ran)"
    users = (
        "one SMTP user for every PowerEmail measurement (`--shared-smtp-user`)"
        if args.shared_smtp_user
        else "a new SMTP user per PowerEmail measurement, so each starts with an empty rolling hour"
    )
    roles = "api,smtp,delivery" if args.deliver else "api,smtp"
    delivery = (
        ", delivering everything it accepts meanwhile through `--relay` to Postfix's `smtp-sink` on"
        " loopback (`--deliver`; its CPU is not counted as PowerEmail's)"
        if args.deliver
        else ""
    )
    profiles = "".join(
        f"\n\n## Profile: PowerEmail on {store_label(store)}, reused connections, 1 KB\n\n"
        f"py-spy {py_spy_version()} `record --gil` for {max(2, int(args.profile_seconds))} s during an"
        f" extra, uncounted run.\n\n{summary}"
        for store, summary in outcome.profiles.items()
    )
    return f"""# SMTP submission benchmark

Made by `python bench/smtp.py` (see its docstring); rerun it to refresh this file.

- Date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}; PowerEmail at {version}
- Machine: `nproc` = {len(os.sched_getaffinity(0))}, {cpu_model()}
- Python: {platform.python_version()} ({platform.python_implementation()}), {versions()}{pg_version}
- Parameters: {args.runs} runs x {args.duration:g} s per measurement, {args.sessions} sessions in \
{args.client_processes} load-generator process(es), {args.warmup:g} s warm-up per (target, mode, size) first \
(not counted){quiet_text(args)}; 1 recipient per message; 1 KB = 1,024 and 100 KB = 102,400 bytes \
of message (headers included)
- Stores: {stores_text(args.database_url)}; {users}
- Servers: `poweremail serve --roles {roles} --max-connections-per-address 1000 --log-level WARNING \
--workers {args.workers}{delivery_workers_flag(args)}`
  (AUTH PLAIN on the plaintext submission port, allowed from loopback; 250 only once the message and
  its count are committed to the store){delivery} and `bench/bare_smtp.py`:
  aiosmtpd on the same event-loop setup (`loop.create_server` in `asyncio.run`, same size limit,
  command limits and logging), AUTH PLAIN checked in memory, every message answered `250 OK` and
  discarded. One process each, one event loop{workers_text(args)}; the load generator
  (`bench/smtp_load.py`, asyncio streams, one command per round trip) runs in its own process(es)
  on the same machine.
- Modes: *reused connection*: every session logs in once, before the clock starts, then sends
  MAIL/RCPT/DATA back to back; *new connection per message*: connect, greeting, EHLO, AUTH PLAIN,
  MAIL/RCPT/DATA, QUIT, for every message.

Medians over the runs. "ratio" is PowerEmail's median msg/s over the bare server's; the CPU columns
are the server's median CPU use in cores (PowerEmail's includes its database threads and, on
PostgreSQL, the database backends serving it); near 1.00, a server was CPU-bound (one Python
process: the GIL lets all its threads together use about one core).
Only messages whose final dot got a 2xx reply count; "errors" are all other replies, refused or
dropped connections and timeouts, for both targets.

{table(rows)}

{chr(10).join(verdicts(rows))}

## Checks

{checks}

## Failures

{problems}

## Every measurement

Within each run the targets alternate: for each (mode, size), bare, then PowerEmail. "first s / last
s" are the messages sent in the first and last whole second. The CPU columns are in cores: "server
CPU" is the server under load ("+ db": its PostgreSQL backends); "client CPU" the load generator;
"other CPU" what other processes used meanwhile; "steal" the time the hypervisor gave this machine's
virtual CPUs to others. {noise_note(outcome.measurements)}

{runs_table(outcome.measurements)}{profiles}
"""


def source_version() -> str:
    """The commit the servers run, marked when src/ has uncommitted changes: the figures belong to it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    # The last commit that changed src/: commits of other files (a report, a benchmark) during a run
    # do not change what the servers run.
    commit = git("log", "-1", "--format=%h", "--", "src") or "unknown commit"
    return commit + (" with uncommitted changes in src/" if git("status", "--porcelain", "--", "src") else "")


def workers_text(args: argparse.Namespace) -> str:
    if args.delivery_workers:
        return (
            f" (PowerEmail: {args.workers} worker process(es) serving the API and SMTP and"
            f" {args.delivery_workers} delivering, their CPU added up in its server CPU, each one's in the"
            " terminal's progress lines)"
        )
    if args.workers == 1:
        return ""
    return (
        f" (PowerEmail: {args.workers} worker processes sharing its ports, their CPU added up in"
        " its server CPU, each worker's in the terminal's progress lines)"
    )


def delivery_workers_flag(args: argparse.Namespace) -> str:
    return f" --delivery-workers {args.delivery_workers}" if args.delivery_workers else ""


def quiet_text(args: argparse.Namespace) -> str:
    if not args.quiet_wait:
        return ""
    return f", up to {args.quiet_wait:g} s wait before each measurement for other processes to go idle"


def py_spy() -> str:
    """py-spy of this Python's environment (the bench extra installs it there), else one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def py_spy_version() -> str:
    try:
        return importlib.metadata.version("py-spy")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs; each measures every case once (default 3)")
    parser.add_argument(
        "--duration", type=float, default=8, help="seconds of load per measurement (default 8)"
    )
    parser.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions (default 20)")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load-generator processes sharing the sessions (default 1)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1,
        help="seconds of uncounted load per case before the runs (default 1)",
    )
    parser.add_argument(
        "--database-url",
        action="append",
        metavar="URL",
        help="PowerEmail's store: 'sqlite' (the default) or postgresql://USER@HOST:PORT/DB, whose server gets"
        " a fresh database poweremail_bench_<random>, dropped after; repeat to measure several stores",
    )
    parser.add_argument(
        "--shared-smtp-user",
        action="store_true",
        help="send every PowerEmail measurement as one SMTP user (default: a new user per measurement)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each measurement, wait up to SECONDS for other processes to leave the machine idle"
        " (for shared machines; default 0: never wait)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile PowerEmail with py-spy during one extra reused 1 KB run",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=10, help="length of the profile (default 10)"
    )
    parser.add_argument(
        "--deliver",
        action="store_true",
        help="PowerEmail also runs its delivery worker, relaying everything it accepts to Postfix's"
        " smtp-sink on loopback (installed as root if missing), as a production node does",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="PowerEmail's `serve --workers N`: worker processes sharing its ports (default 1)",
    )
    parser.add_argument(
        "--delivery-workers",
        type=int,
        default=0,
        help="with --deliver: `serve --delivery-workers M`, processes that only deliver (default 0)",
    )
    parser.add_argument(
        "--report", type=Path, default=REPORT_PATH, help=f"markdown output (default {REPORT_PATH})"
    )
    args = parser.parse_args()
    args.receiver = None
    if args.deliver and find_smtp_sink() is None and install_smtp_sink() is None:
        parser.error(f"--deliver needs Postfix's smtp-sink; install it as root: {SMTP_SINK_SETUP}")
    args.database_url = args.database_url or [SQLITE]
    for url in args.database_url:
        if url != SQLITE and make_url(url).get_backend_name() not in ("postgresql", "postgres"):
            parser.error(f"--database-url must be 'sqlite' or a postgresql:// URL, not {url!r}")
    if min(args.runs, args.sessions, args.client_processes) < 1 or min(args.duration, args.warmup) <= 0:
        parser.error("--runs, --sessions and --client-processes must be >= 1; --duration and --warmup > 0")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be from 1 to 64")
    if args.delivery_workers and not args.deliver:
        parser.error("--delivery-workers needs --deliver")
    if args.client_processes > args.sessions:
        parser.error("--client-processes cannot exceed --sessions")
    if args.profile and shutil.which(py_spy()) is None:
        parser.error("--profile needs py-spy: pip install py-spy")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # SystemExit unwinds through the same finally clauses as Ctrl-C: servers stop, databases are
    # dropped, the temporary directory goes.
    raise SystemExit(128 + signum)


def benchmark(args: argparse.Namespace, work: Path) -> Outcome:
    outcome = Outcome()
    bare_port = free_port()
    bare_log = work / "bare.log"
    bare_command = [sys.executable, str(BARE_SCRIPT), "--port", str(bare_port)]
    with contextlib.ExitStack() as stack:
        if args.deliver:
            args.receiver = Receiver("smtp-sink", work)
            sink = stack.enter_context(
                running(args.receiver.command, args.receiver.log, lambda: greets(args.receiver.port))
            )
            args.receiver.pid = sink.pid
        bare_server = stack.enter_context(running(bare_command, bare_log, lambda: greets(bare_port)))
        bare_pid = bare_server.pid
        bare = Target(BARE, bare_port, bare_pid, lambda: Credentials(BARE_USER, BARE_PASSWORD))
        for store in args.database_url:
            print(f"{store_label(store)}: {args.runs} runs x {len(MODES) * len(SIZES)} cases x 2 targets"
                  f" x {args.duration:g} s, {args.sessions} sessions", flush=True)  # fmt: skip
            bench_store(store, args, work, bare, outcome)
    outcome.problems += [f"bare server logged: {line}" for line in server_errors(bare_log)[:20]]
    for m in outcome.measurements:
        if m.errors:
            label = {WARMUP: "warm-up", PROFILED: "profiled run"}.get(m.run, f"run {m.run}")
            where = f"{store_label(m.store)} {label}, {m.target} {m.mode} {m.size}"
            outcome.problems.append(f"{where}: {m.error_count} errors {m.errors}")
    return outcome


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    pg_version = postgres_version(args.database_url)
    version = source_version()
    print(f"PowerEmail at {version}", flush=True)
    with tempfile.TemporaryDirectory(prefix="poweremail-smtp-bench-") as tmp:
        outcome = benchmark(args, Path(tmp))
    if (version_after := source_version()) != version:
        # Each server imports src/ when it starts: its figures may belong to either version.
        outcome.problems.append(f"the source changed during the benchmark ({version} -> {version_after})")
    rows = summarize(outcome.measurements, args.database_url)
    return publish(
        args.report,
        report=render_report(args, rows, outcome, pg_version, version),
        summary=summary_rows(rows, args),
        tables=table(rows),
        lines=[*verdicts(rows), *outcome.checks],
        profiles=outcome.profiles,
        problems=outcome.problems,
        note=noise_note(outcome.measurements),
    )


def publish(
    path: Path,
    *,
    report: str,
    summary: list[dict[str, Any]],
    tables: str,
    lines: list[str],
    profiles: dict[str, str],
    problems: list[str],
    note: str,
) -> int:
    """Write the report and its JSON summary (for bench/run.py), say the same on the terminal; the
    exit status: 1 if anything failed. Shared with bench/delivery.py."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{tables}\n")
    for line in lines:
        print(line.replace("**", ""))
    for store, profile in profiles.items():
        print(f"\nprofile, {store_label(store)}:\n{profile}")
    for problem in problems:
        print(f"FAILURE: {problem}")
    print(f"NOTE: {note}".replace("**", ""))
    print(f"\nwritten to {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are stopped, databases dropped and the directory removed by now
        print("bench/smtp.py: interrupted", file=sys.stderr)
        sys.exit(130)
