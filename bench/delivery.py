"""End-to-end benchmark of delivery: accepted by PowerEmail's SMTP server, delivered to a local receiver.

    python bench/delivery.py [--runs 3] [--duration 10] [--sessions 20] [--database-url URL ...]
                             [--delivery CONCURRENCY:CONNECTIONS ...] [--quiet-wait SECONDS] [--profile]

The receiver is Postfix's ``smtp-sink`` (a single-process C server that answers every message with 250
and throws it away, counting them), listening on loopback. If it is missing, the benchmark installs it
(as root): ``echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections``,
then ``DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix``. "No
configuration" leaves /etc/postfix/main.cf absent, so neither the init script nor systemd's unit
starts a Postfix daemon on port 25; only the ``smtp-sink`` binary is used. ``--receiver bare`` uses
bench/bare_smtp.py instead (Python, no count of its own, and it competes for the same 2 cores).

For each store (SQLite by default; ``--database-url postgresql://...`` makes a fresh database per server,
dropped afterwards, as bench/smtp.py does) the benchmark starts, each on a store of its own:

- ``poweremail serve --roles api,smtp``: acceptance alone, the baseline;
- ``poweremail serve --roles api,smtp,delivery --relay 127.0.0.1:SINK --relay-tls none`` once per
  ``--delivery`` setting (``--delivery-concurrency`` : ``--max-connections-per-destination``; default
  ``50:10``, the server's defaults).

Every measurement loads one server with bench/smtp.py's load (bench/smtp_load.py: ``--sessions``
sessions on reused logged-in connections, 1 KB messages with one recipient, AUTH PLAIN) for
``--duration`` seconds, as a new SMTP user. Meanwhile the benchmark reads the queue straight from the
store every 0.5 s (recipients in state queued or deferred: the backlog); once the load stops it goes on
reading until the queue is empty. Per delivery setting, each run alternates: the baseline, delivery
alone (below), the delivering server; medians over the runs go to the terminal and
docs/benchmarks/delivery.md. One delivering server runs at a time (on PostgreSQL each keeps up to 20
connections open).

Figures, from the store's own timestamps (messages.accepted_at, recipients.last_attempt_at):
accepted msg/s during the fill (2xx replies / the load's time); delivered msg/s during the fill
(recipients that reached ``delivered`` before the load's last reply); end-to-end msg/s (delivered /
from the first accepted to the last delivered); the largest and the last backlog of the fill; the drain
time from the load's last reply to the last delivery. The target: the queue drains at least as fast as
it fills (delivered during the fill >= 95% of accepted, so no growing backlog).

Checks after every measurement: the run's recipients delivered in the store == 2xx replies the load
counted == messages smtp-sink counted (``-c``); nothing deferred or bounced; no bounce queued. Exits 1
on any error, mismatch or server error log. ``--profile`` adds one uncounted delivery run per store
under py-spy (``pip install py-spy``): where the server's GIL time goes during the fill and the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import asyncpg
from _machine import child_pids, cpu_model, machine_cpu, own_cpu, process_cpu
from _receiver import SMTP_SINK_SETUP, Receiver, find_smtp_sink, install_smtp_sink
from _servers import free_port, running, stop_process
from sqlalchemy import make_url

from smtp import (  # bench/ is on sys.path: scripts run as python bench/X.py
    GO_DELAY_S,
    NOISY_OTHER_CORES,
    SQLITE,
    Load,
    PowerEmailApi,
    Target,
    api_answers,
    asyncpg_dsn,
    backend_pids,
    collect,
    create_owner,
    greets,
    load_command,
    postgres_version,
    poweremail_command,
    publish,
    server_errors,
    source_version,
    split_sessions,
    start_clients,
    stop_clients,
    store_label,
    store_url,
    stores_text,
    summarize_profile,
    thread_cpu,
    versions,
    wait_for_quiet,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
REPORT_PATH = REPO_ROOT / "docs" / "benchmarks" / "delivery.md"

SAMPLE_INTERVAL_S = 0.5
# Delivered during the fill at least this share of what was accepted: the queue keeps up.
KEEP_UP_SHARE = 0.95
# poweremail.config.Settings: delivery_concurrency, max_connections_per_destination
SERVER_DEFAULTS = (50, 10)
BASELINE = "api,smtp"
WARMUP, PROFILED = 0, -1  # Measurement.run of the uncounted measurements
# In a profile: which part of the server a stack belongs to, by the first of these frames it holds.
# The deepest frame of a stack that holds one of these markers decides the part (first match wins).
PARTS = (
    ("claim_due (", "delivery: claim due recipients (store)"),
    ("load_messages (", "delivery: read the message (store)"),
    ("record_attempts (", "delivery: record the outcome (store)"),
    ("delivery_queue.py", "delivery: other store work (leases)"),
    ("delivery/smtp_client.py", "delivery: SMTP client (smtp_client.py, outbound.py)"),
    ("delivery/outbound.py", "delivery: SMTP client (smtp_client.py, outbound.py)"),
    ("poweremail/delivery/", "delivery: the worker's own code (claim loop, routing, pool)"),
    ("poweremail/smtp/", "submission (aiosmtpd, handler, its store work)"),
    ("aiosmtpd/", "submission (aiosmtpd, handler, its store work)"),
    ("store/messages.py", "submission (aiosmtpd, handler, its store work)"),
    ("_sqlite_batches.py", "store threads: BEGIN, COMMIT, batching"),
)


# --- reading the store ------------------------------------------------------------------------

PENDING_SQL = "SELECT count(*) FROM recipients WHERE state IN ('queued', 'deferred')"
STATES_SQL = "SELECT state, count(*) FROM recipients GROUP BY state"
DELIVERED_SQL = "SELECT last_attempt_at FROM recipients WHERE state = 'delivered'"
BOUNCES_SQL = "SELECT count(*) FROM messages WHERE bounce_of IS NOT NULL"
RUN_SQL = (
    "SELECT m.accepted_at, r.state, r.last_attempt_at FROM recipients r"
    " JOIN messages m ON m.id = r.message_id JOIN smtp_users u ON u.id = m.smtp_user_id"
    " WHERE u.name = {user}"
)


def posix(value: datetime.datetime | str | None) -> float | None:
    """A store timestamp as POSIX seconds. SQLite hands back text in UTC without a zone."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class StoreReader:
    """The queue as the store has it, read with the plain driver (not through PowerEmail)."""

    def __init__(self, database_url: str) -> None:
        self._sqlite: sqlite3.Connection | None = None
        self._pg: asyncpg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.backend_pid: int | None = None  # PostgreSQL: ours, left out of the server's database CPU
        url = make_url(database_url)
        if url.get_backend_name() == "sqlite":
            # Autocommit: every query a snapshot of its own, no read transaction left open.
            self._sqlite = sqlite3.connect(str(url.database), timeout=30, isolation_level=None)
            self._sqlite.execute("PRAGMA query_only=1")
        else:
            self._loop = asyncio.new_event_loop()
            self._pg = self._loop.run_until_complete(asyncpg.connect(asyncpg_dsn(database_url), timeout=10))
            self.backend_pid = self._loop.run_until_complete(self._pg.fetchval("SELECT pg_backend_pid()"))

    def _rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self._sqlite is not None:
            return list(self._sqlite.execute(sql.format(user="?"), params).fetchall())
        assert self._pg is not None and self._loop is not None
        records = self._loop.run_until_complete(self._pg.fetch(sql.format(user="$1"), *params))
        return [tuple(record) for record in records]

    def pending(self) -> int:
        return int(self._rows(PENDING_SQL)[0][0])

    def states(self) -> dict[str, int]:
        return {state: int(n) for state, n in self._rows(STATES_SQL)}

    def bounces(self) -> int:
        return int(self._rows(BOUNCES_SQL)[0][0])

    def delivered_times(self) -> list[float]:
        """When each delivered recipient of the store was delivered (its last attempt)."""
        return [posix(t) or 0.0 for (t,) in self._rows(DELIVERED_SQL)]

    def run_rows(self, user: str) -> list[tuple[float, str, float | None]]:
        """(accepted at, state, last attempt at) of every recipient ``user`` sent."""
        rows = self._rows(RUN_SQL, user)
        return [(posix(accepted) or 0.0, state, posix(attempted)) for accepted, state, attempted in rows]

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None and self._loop is not None:
            self._loop.run_until_complete(self._pg.close())
            self._loop.close()


# --- servers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How one PowerEmail server runs: acceptance alone (None), or delivering with these limits."""

    delivery: tuple[int, int] | None  # (--delivery-concurrency, --max-connections-per-destination)
    # Delivery in a process of its own: `serve --workers 1 --delivery-workers 1`.
    separate: bool = False

    @property
    def limits(self) -> str:
        return "-" if self.delivery is None else f"{self.delivery[0]}/{self.delivery[1]}"

    @property
    def label(self) -> str:
        if self.delivery is None:
            return f"{BASELINE} (no delivery)"
        return f"delivery {self.limits}" + (" in a 2nd process" if self.separate else "")


@dataclass
class Server:
    setting: Setting
    smtp_port: int
    pid: int
    api: PowerEmailApi
    reader: StoreReader
    database_name: str | None
    log_path: Path
    data_dir: Path
    database_url: str


def delivery_flags(delivery: tuple[int, int], receiver: Receiver, node: str) -> list[str]:
    concurrency, connections = delivery
    return [
        "--relay", f"127.0.0.1:{receiver.port}", "--relay-tls", "none", *receiver.relay_login,
        "--node-name", node, "--delivery-concurrency", str(concurrency),
        "--max-connections-per-destination", str(connections),
    ]  # fmt: skip


@contextlib.contextmanager
def poweremail_server(
    store: str, setting: Setting, work: Path, receiver: Receiver, index: int
) -> Iterator[Server]:
    """A PowerEmail server on a fresh store of its own, while the block runs."""
    data_dir = work / f"poweremail-{index}"
    log_path = data_dir.with_suffix(".log")
    with store_url(store, data_dir) as (database_url, database_name):
        owner = create_owner(data_dir, database_url)
        api_port, smtp_port, smtps_port = free_port(), free_port(), free_port()
        serve = poweremail_command(
            "serve", "--data-dir", str(data_dir), "--database-url", database_url,
            "--api-port", str(api_port), "--smtp-port", str(smtp_port), "--smtps-port", str(smtps_port),
            "--max-connections-per-address", "1000", "--log-level", "WARNING",
        )  # fmt: skip
        if setting.delivery is None:
            serve += ["--roles", BASELINE]
        else:
            serve += [
                "--roles",
                "api,smtp,delivery",
                *delivery_flags(setting.delivery, receiver, f"bench-{index}"),
            ]
            if setting.separate:
                serve += ["--workers", "1", "--delivery-workers", "1"]

        def ready() -> bool:
            return greets(smtp_port) and api_answers(api_port)

        with running(serve, log_path, ready) as process:
            api = PowerEmailApi(api_port, owner)
            reader = StoreReader(database_url)
            try:
                yield Server(
                    setting,
                    smtp_port,
                    process.pid,
                    api,
                    reader,
                    database_name,
                    log_path,
                    data_dir,
                    database_url,
                )
            finally:
                reader.close()
                api.close()


# --- one measurement --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cpu:
    """CPU seconds so far: the machine, the server, its PostgreSQL backends, the receiver, this
    script with its waited children (the load generators once they end), steal."""

    machine: float
    steal: float
    server: float
    database: dict[int, float]
    receiver: float
    ours: float
    at: float  # time.monotonic()

    @classmethod
    def take(cls, server: Server, receiver: Receiver, pid: int | None = None) -> Cpu:
        """``pid``: the process to measure, if not ``server`` itself (one on the same store)."""
        machine, steal = machine_cpu()
        backends = [pid for pid in backend_pids(server.database_name) if pid != server.reader.backend_pid]
        return cls(
            machine=machine,
            steal=steal,
            # With --delivery-workers the server is a supervisor: its workers are its children.
            server=process_cpu(pid)
            if pid is not None
            else process_cpu(server.pid) + sum(map(process_cpu, child_pids(server.pid))),
            database={pid: process_cpu(pid) for pid in backends},
            receiver=process_cpu(receiver.pid),
            ours=own_cpu(),
            at=time.monotonic(),
        )

    def database_since(self, before: Cpu) -> float:
        return sum(cpu - before.database.get(pid, 0.0) for pid, cpu in self.database.items())


@dataclass(frozen=True)
class Measurement:
    store: str
    run: int  # 1, 2, ...; WARMUP and PROFILED are not counted
    setting: Setting
    user: str
    sent: int  # 2xx replies to the final dot
    errors: dict[str, int]
    fill_s: float  # from the load's start to its last 2xx
    p50_ms: float
    p99_ms: float
    samples: list[tuple[float, int]]  # (seconds since the start, recipients queued or deferred)
    stored: int  # the user's recipients in the store
    delivered: int  # ... of them delivered
    other_states: dict[str, int]  # ... of them neither delivered nor (for the baseline) queued
    delivered_in_fill: int  # delivered before the load's last 2xx
    end_to_end_s: float  # first accepted to last delivered
    drain_s: float  # the load's last 2xx to the last delivered
    drained: bool
    received: int | None  # the receiver's count of messages during this measurement
    server_cpu_fill: float  # seconds: the server process and its PostgreSQL backends, during the fill
    server_cpu_all: float  # seconds: the same, fill and drain
    receiver_cpu: float  # seconds, fill and drain
    client_cores: float
    other_cores: float  # anything else on the machine, fill and drain
    steal_cores: float
    paired: str = ""  # a baseline: the label of the delivery setting whose cycle it opened

    @property
    def counted(self) -> bool:
        return self.run > 0

    @property
    def delivers(self) -> bool:
        return self.setting.delivery is not None

    @property
    def accepted_rate(self) -> float:
        return self.sent / self.fill_s if self.fill_s > 0 else 0.0

    @property
    def delivered_rate_in_fill(self) -> float:
        return self.delivered_in_fill / self.fill_s if self.fill_s > 0 else 0.0

    @property
    def end_to_end_rate(self) -> float:
        return self.delivered / self.end_to_end_s if self.end_to_end_s > 0 else 0.0

    @property
    def fill_samples(self) -> list[int]:
        return [pending for t, pending in self.samples if t <= self.fill_s + SAMPLE_INTERVAL_S]

    @property
    def max_backlog(self) -> int:
        return max(self.fill_samples, default=0)

    @property
    def backlog_at_end(self) -> int:
        """The first sample after the load's last reply (taken as soon as the load ended)."""
        after = [pending for t, pending in self.samples if t >= self.fill_s]
        return after[0] if after else 0

    @property
    def cpu_ms_per_message(self) -> float:
        return 1000 * self.server_cpu_all / self.sent if self.sent else 0.0

    @property
    def fill_cores(self) -> float:
        return self.server_cpu_fill / self.fill_s if self.fill_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def noisy(self) -> bool:
        return self.other_cores > NOISY_OTHER_CORES


@dataclass
class Outcome:
    measurements: list[Measurement] = field(default_factory=list)
    drains: list[Drain] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)  # store -> summary (markdown)


@dataclass(frozen=True)
class Recording:
    phase: str
    raw: Path  # py-spy's raw output
    seconds: float
    threads: str  # where the process's CPU went by thread meanwhile


class Profiler:
    """py-spy --gil on a server, one recording per phase, each stopped with SIGINT."""

    def __init__(self, pid: int, work: Path) -> None:
        self.pid = pid
        self._work = work
        self._spy: subprocess.Popen[bytes] | None = None
        self._phase = ""
        self._raw = work
        self._started = 0.0
        self._threads: dict[int, tuple[float, float]] = {}
        self.recordings: list[Recording] = []

    def start(self, phase: str) -> None:
        self._phase = phase
        self._raw = self._work / f"profile-{secrets.token_hex(4)}.txt"
        command = ["py-spy", "record", "--pid", str(self.pid), "--rate", "100", "--gil", "--nonblocking",
                   "--format", "raw", "--output", str(self._raw)]  # fmt: skip
        with self._raw.with_suffix(".log").open("wb") as log:
            self._spy = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        self._threads = thread_cpu(self.pid)
        self._started = time.monotonic()

    def stop(self) -> None:
        if self._spy is None:
            return
        seconds = time.monotonic() - self._started
        after = thread_cpu(self.pid)
        self._spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            self._spy.wait(30)
        finally:
            stop_process(self._spy)
        self._spy = None
        self.recordings.append(Recording(self._phase, self._raw, seconds, self._by_thread(after, seconds)))

    def _by_thread(self, after: dict[int, tuple[float, float]], seconds: float) -> str:
        def spent(tid: int) -> float:
            user, system = after[tid]
            user_before, system_before = self._threads.get(tid, (0.0, 0.0))
            return (user - user_before) + (system - system_before)

        loop = spent(self.pid) if self.pid in after else 0.0
        others = sorted((spent(tid) for tid in after if tid != self.pid), reverse=True)
        busy = (
            ", ".join(f"{cpu / seconds:.2f}" for cpu in others if cpu / seconds >= 0.01) or "none over 0.01"
        )
        return (
            f"The process used {(loop + sum(others)) / seconds:.2f} cores: its event-loop thread"
            f" {loop / seconds:.2f}, its {len(others)} other threads {sum(others) / seconds:.2f}"
            f" (the busy ones: {busy})."
        )


def measure(
    server: Server,
    receiver: Receiver,
    args: argparse.Namespace,
    store: str,
    run: int,
    duration: float,
    profiler: Profiler | None = None,
) -> Measurement:
    """Load ``server`` for ``duration`` seconds as a new SMTP user, reading the backlog every 0.5 s;
    then, if it delivers, read on until the queue is empty."""
    credentials = server.api.add_smtp_user()
    load = Load("reused", "1 KB", args.sessions, duration, args.client_processes)
    target = Target("PowerEmail", server.smtp_port, server.pid, lambda: credentials, server.database_name)
    commands = [
        load_command(target, credentials, load, n) for n in split_sessions(load.sessions, load.processes)
    ]
    received_before = receiver.count()
    clients = start_clients(commands)
    samples: list[tuple[float, int]] = []
    try:
        start_at = time.time() + GO_DELAY_S
        for client in clients:
            assert client.stdin is not None
            client.stdin.write(f"GO {start_at}\n")
            client.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        before = Cpu.take(server, receiver)
        if profiler is not None:
            profiler.start("fill")
        tick = start_at
        while any(client.poll() is None for client in clients):
            tick += SAMPLE_INTERVAL_S
            while time.time() < tick and any(client.poll() is None for client in clients):
                time.sleep(min(0.02, max(0.0, tick - time.time())))
            samples.append((time.time() - start_at, server.reader.pending()))
        filled = Cpu.take(server, receiver)
        if profiler is not None:
            profiler.stop()
        results = collect(clients, timeout=60)
    finally:
        stop_clients(clients)
    fill_s = max(r["elapsed"] for r in results)
    samples.append((time.time() - start_at, server.reader.pending()))  # the backlog at the end of the fill
    drained = True
    if server.setting.delivery is not None:
        if profiler is not None and samples[-1][1]:
            profiler.start("drain")
        deadline = time.monotonic() + args.drain_timeout
        tick = time.time()
        while samples[-1][1] > 0:
            if time.monotonic() > deadline:
                drained = False
                break
            tick += SAMPLE_INTERVAL_S
            time.sleep(max(0.0, tick - time.time()))
            samples.append((time.time() - start_at, server.reader.pending()))
        if profiler is not None:
            profiler.stop()
        time.sleep(0.2)  # the receiver's counter is written as the message ends; let it land
    after = Cpu.take(server, receiver)
    received_after = receiver.count()

    rows = server.reader.run_rows(credentials.user)
    states = Counter(state for _, state, _ in rows)
    delivered_at = [attempted for _, state, attempted in rows if state == "delivered" and attempted]
    first_accepted = min((accepted for accepted, _, _ in rows), default=start_at)
    fill_end = start_at + fill_s
    last_delivered = max(delivered_at, default=fill_end)
    expected = "delivered" if server.setting.delivery is not None else "queued"
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
    window = time.time() - start_at
    server_all = (after.server - before.server) + after.database_since(before)
    ours = after.ours - before.ours
    receiver_cpu = after.receiver - before.receiver
    return Measurement(
        store=store,
        run=run,
        setting=server.setting,
        user=credentials.user,
        sent=sum(r["sent"] for r in results),
        errors=dict(errors),
        fill_s=fill_s,
        p50_ms=max(r["p50_ms"] for r in results),
        p99_ms=max(r["p99_ms"] for r in results),
        samples=samples,
        stored=len(rows),
        delivered=states["delivered"],
        other_states={state: n for state, n in states.items() if state != expected},
        delivered_in_fill=sum(1 for t in delivered_at if t <= fill_end),
        end_to_end_s=last_delivered - first_accepted if delivered_at else 0.0,
        drain_s=max(0.0, last_delivered - fill_end) if delivered_at else 0.0,
        drained=drained,
        received=None if received_before is None or received_after is None
        else received_after - received_before,
        server_cpu_fill=(filled.server - before.server) + filled.database_since(before),
        server_cpu_all=server_all,
        receiver_cpu=receiver_cpu,
        client_cores=sum(r["cpu_seconds"] for r in results) / fill_s if fill_s else 0.0,
        other_cores=max(0.0, (after.machine - before.machine) - server_all - receiver_cpu - ours) / window,
        steal_cores=(after.steal - before.steal) / window,
    )  # fmt: skip


def check(m: Measurement, server: Server) -> list[str]:
    """What is wrong with a measurement's outcome: counts that disagree, mail not delivered."""
    where = f"{store_label(m.store)} {run_label(m.run)}, {m.setting.label}"
    problems = []
    if m.error_count:
        problems.append(f"{where}: {m.error_count} load errors {m.errors}")
    if m.stored != m.sent:
        problems.append(f"{where}: {m.stored} recipients in the store, {m.sent} 2xx replies counted")
    if m.other_states:
        problems.append(f"{where}: recipients in unexpected states {m.other_states}")
    if m.delivers:
        if not m.drained:
            problems.append(
                f"{where}: the queue was not empty {m.samples[-1][0] - m.fill_s:.0f} s after the load"
            )
        if m.delivered != m.sent:
            problems.append(f"{where}: {m.delivered} recipients delivered, {m.sent} 2xx replies counted")
        if m.received is not None and m.received != m.sent:
            problems.append(f"{where}: smtp-sink counted {m.received} messages, {m.sent} 2xx replies counted")
        if bounces := server.reader.bounces():
            problems.append(f"{where}: {bounces} bounce(s) queued")
    return problems


@dataclass(frozen=True)
class Drain:
    """Delivery alone: a node with ``--roles delivery`` emptying the queue an api,smtp server filled."""

    store: str
    run: int
    setting: Setting
    queued: int  # recipients queued or deferred when it started
    delivered: int  # recipients it delivered
    first_s: float  # from its start to its first delivery (startup: imports, store, first claim)
    delivering_s: float  # its first delivery to its last
    drained: bool
    received: int | None  # the receiver's count of messages meanwhile
    cpu_s: float  # its CPU and its PostgreSQL backends', from the first delivery seen to the empty queue
    cpu_messages: int  # recipients delivered in that time
    cpu_window_s: float  # that time
    other_cores: float
    bounces: int

    @property
    def counted(self) -> bool:
        return self.run > 0

    @property
    def rate(self) -> float:
        return self.delivered / self.delivering_s if self.delivering_s > 0 else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        return 1000 * self.cpu_s / self.cpu_messages if self.cpu_messages else 0.0

    @property
    def cores(self) -> float:
        return self.cpu_s / self.cpu_window_s if self.cpu_window_s > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.other_cores > NOISY_OTHER_CORES

    def problems(self) -> list[str]:
        where = f"{store_label(self.store)} {run_label(self.run)}, delivery alone {self.setting.limits}"
        problems = []
        if not self.drained:
            problems.append(f"{where}: the queue was not empty after the drain timeout")
        if self.delivered != self.queued:
            problems.append(f"{where}: {self.delivered} delivered of {self.queued} queued")
        if self.received is not None and self.received != self.queued:
            problems.append(f"{where}: smtp-sink counted {self.received} messages of {self.queued} queued")
        if self.bounces:
            problems.append(f"{where}: {self.bounces} bounce(s) queued")
        return problems


def drain_alone(
    base: Server,
    setting: Setting,
    receiver: Receiver,
    args: argparse.Namespace,
    store: str,
    run: int,
    profiler: Profiler | None = None,
) -> Drain:
    """Start ``poweremail serve --roles delivery`` on ``base``'s store (filled by ``base``, which
    idles meanwhile) and time it emptying the queue; then stop it."""
    assert setting.delivery is not None
    queued = base.reader.pending()
    delivered_before = len(base.reader.delivered_times())
    received_before = receiver.count()
    node = f"bench-drain-{secrets.token_hex(3)}"
    command = poweremail_command(
        "serve", "--data-dir", str(base.data_dir), "--database-url", base.database_url,
        "--roles", "delivery", "--log-level", "WARNING", *delivery_flags(setting.delivery, receiver, node),
    )  # fmt: skip
    log_path = base.log_path.with_name(f"{node}.log")
    wall_start = time.time()
    deadline = time.monotonic() + args.drain_timeout
    with running(command, log_path, lambda: True) as process:
        pending = queued
        while pending == queued and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            pending = base.reader.pending()
        before = Cpu.take(base, receiver, process.pid)
        if profiler is not None:
            profiler.pid = process.pid
            profiler.start("drain, delivery alone")
        at_first = pending
        while pending > 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(SAMPLE_INTERVAL_S)
            pending = base.reader.pending()
        after = Cpu.take(base, receiver, process.pid)
        if profiler is not None:
            profiler.stop()
        time.sleep(0.2)  # the receiver's counter is written as the message ends; let it land
    window = max(1e-6, after.at - before.at)
    times = sorted(t for t in base.reader.delivered_times() if t >= wall_start)
    server_cpu = (after.server - before.server) + after.database_since(before)
    received_after = receiver.count()
    other = (
        (after.machine - before.machine)
        - server_cpu
        - (after.receiver - before.receiver)
        - (after.ours - before.ours)
    )
    return Drain(
        store=store,
        run=run,
        setting=Setting(setting.delivery),  # the same alone whether the fill's server delivers itself or not
        queued=queued,
        delivered=len(base.reader.delivered_times()) - delivered_before,
        first_s=times[0] - wall_start if times else 0.0,
        delivering_s=times[-1] - times[0] if len(times) > 1 else 0.0,
        drained=pending == 0,
        received=None if received_before is None or received_after is None
        else received_after - received_before,
        cpu_s=server_cpu,
        cpu_messages=at_first - pending,
        cpu_window_s=window,
        other_cores=max(0.0, other) / window,
        bounces=base.reader.bounces(),
    )  # fmt: skip


def drain_check_line(d: Drain) -> str:
    received = f" = {d.received:,} counted by smtp-sink" if d.received is not None else ""
    return f"{d.queued:,} queued = {d.delivered:,} delivered{received}"


def drain_line(d: Drain) -> str:
    flags = ("  (noisy)" if d.noisy else "") + ("" if d.drained else "  NOT DRAINED")
    return (
        f"{'delivery alone ' + d.setting.limits:<32} {d.queued:,} queued: {d.rate:6.0f} msg/s"
        f"  CPU {d.cores:.2f}, {d.cpu_ms_per_message:.2f} ms/msg  first after {d.first_s:.1f} s"
        f"  other {d.other_cores:.2f}{flags}"
    )


def check_line(m: Measurement) -> str:
    if not m.delivers:
        return f"{m.sent:,} accepted = {m.stored:,} queued in the store"
    received = f" = {m.received:,} counted by smtp-sink" if m.received is not None else ""
    return f"{m.sent:,} accepted = {m.delivered:,} delivered in the store{received}"


def run_label(run: int) -> str:
    return {WARMUP: "warm-up", PROFILED: "profiled run"}.get(run, f"run {run}")


def progress_line(m: Measurement) -> str:
    flags = "".join(
        [
            f"  ERRORS {m.errors}" if m.errors else "",
            "  (noisy)" if m.noisy else "",
            "" if m.drained else "  NOT DRAINED",
        ]
    )
    line = f"{m.setting.label:<32} accepted {m.accepted_rate:6.0f} msg/s  CPU {m.fill_cores:.2f}"
    if m.delivers:
        line += (
            f"  delivered in fill {m.delivered_rate_in_fill:6.0f} msg/s  end-to-end {m.end_to_end_rate:6.0f}"
            f" msg/s  backlog max {m.max_backlog:,} end {m.backlog_at_end:,}  drain {m.drain_s:.1f} s"
        )
    return f"{line}  other {m.other_cores:.2f}{flags}"


# --- profile ----------------------------------------------------------------------------------


def component(stack: str) -> str:
    """Which part of the server a sampled stack works for: the deepest of its frames in PARTS decides."""
    for frame in reversed(stack.split(";")):
        for marker, part in PARTS:
            if marker in frame:
                return part
    return "event loop and the rest (API, idle)"


def summarize_components(raw: Path) -> str:
    shares: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            shares[component(stack)] += int(count)
    total = sum(shares.values())
    if not total:
        return ""
    delivery = sum(n for part, n in shares.items() if part.startswith("delivery"))
    rows = "\n".join(f"| {part} | {n / total:.1%} |" for part, n in sorted(shares.items()))
    return (
        "By part of the server (the deepest frame of a stack that names one), share of the GIL samples;"
        f" delivery in all: {delivery / total:.1%}:\n\n| part | share |\n| --- | ---: |\n{rows}"
    )


def py_spy_version() -> str:
    done = subprocess.run(["py-spy", "--version"], capture_output=True, text=True)
    return done.stdout.strip() or "py-spy (version unknown)"


def profile_summary(fill: Profiler, m: Measurement, alone: Profiler, d: Drain) -> str:
    parts = [
        f"{py_spy_version()} `record --gil --rate 100 --nonblocking` during an extra, uncounted cycle"
        f" with {m.setting.label}: (1) on the delivering server under the load ({m.accepted_rate:,.0f} msg/s"
        f" accepted, {m.delivered_rate_in_fill:,.0f} msg/s delivered during the fill,"
        f" {m.cpu_ms_per_message:.2f} ms of server CPU per message); (2) on a `--roles delivery` node"
        f" emptying a queue of {d.queued:,} alone ({d.rate:,.0f} msg/s, {d.cpu_ms_per_message:.2f} ms of CPU"
        " per message). `--gil` samples only the thread holding the GIL, 100 times a second: the share"
        " of the expected samples taken says how busy the GIL was."
    ]
    for r in [*fill.recordings, *alone.recordings]:
        if not r.raw.exists():
            parts.append(f"### During the {r.phase}\n\npy-spy wrote no profile.")
            continue
        expected = max(1, int(100 * r.seconds))
        parts.append(
            f"### During the {r.phase} ({r.seconds:.1f} s)\n\n{r.threads}\n\n"
            f"{summarize_components(r.raw)}\n\n{summarize_profile(r.raw, expected_samples=expected)}"
        )
    return "\n\n".join(parts)


# --- one store --------------------------------------------------------------------------------


def cycle(
    base: Server,
    server: Server,
    receiver: Receiver,
    args: argparse.Namespace,
    store: str,
    run: int,
    duration: float,
) -> tuple[Measurement, Drain, Measurement]:
    """The baseline under load; delivery alone emptying what it queued; the delivering server under load."""
    label = (
        f"  {store_label(store)} {run_label(run)}/{args.runs}"
        if run > 0
        else f"  {store_label(store)} {run_label(run)}"
    )
    wait_for_quiet(args.quiet_wait)
    baseline = measure(base, receiver, args, store, run, duration)
    print(f"{label}  {progress_line(baseline)}", flush=True)
    wait_for_quiet(args.quiet_wait)
    alone = drain_alone(base, server.setting, receiver, args, store, run)
    print(f"{label}  {drain_line(alone)}", flush=True)
    wait_for_quiet(args.quiet_wait)
    delivering = measure(server, receiver, args, store, run, duration)
    print(f"{label}  {progress_line(delivering)}", flush=True)
    return baseline, alone, delivering


def bench_store(
    store: str, args: argparse.Namespace, work: Path, receiver: Receiver, outcome: Outcome, index: int
) -> None:
    """The baseline server for the whole store; one delivering server at a time beside it (on PostgreSQL
    each keeps up to 20 connections open, and the server's max_connections is shared with others)."""
    measurements: list[Measurement] = []
    drains: list[Drain] = []
    logs: list[tuple[str, Path]] = []
    runs = [(WARMUP, args.warmup), *((run, args.duration) for run in range(1, args.runs + 1))]
    try:
        with poweremail_server(store, Setting(None), work, receiver, 100 * index) as base:
            logs.append((base.setting.label, base.log_path))
            for i, setting in enumerate(args.delivery):
                with poweremail_server(store, setting, work, receiver, 100 * index + 1 + i) as server:
                    logs.append((setting.label, server.log_path))
                    mine: list[Measurement] = []
                    for run, duration in runs:  # the warm-up is not counted: page cache, pools, connections
                        baseline, alone, delivering = cycle(
                            base, server, receiver, args, store, run, duration
                        )
                        mine += [dataclasses.replace(baseline, paired=setting.label), delivering]
                        drains.append(alone)
                    if args.profile and i == 0:
                        mine += profile_cycle(base, server, receiver, args, store, work, outcome, drains)
                    measurements += mine
                    problems = [problem for m in mine if m.delivers for problem in check(m, server)]
                    outcome.problems += problems
                    if not problems:
                        lines = "; ".join(check_line(m) for m in mine if m.delivers)
                        outcome.checks.append(f"{store_label(store)}, {setting.label}: {lines}")
            baselines = [m for m in measurements if not m.delivers]
            problems = [problem for m in baselines for problem in check(m, base)]
            outcome.problems += problems
            if baselines and not problems:
                lines = "; ".join(check_line(m) for m in baselines)
                outcome.checks.append(f"{store_label(store)}, {base.setting.label}: {lines}")
        for setting in dict.fromkeys(d.setting for d in drains):
            mine_drains = [d for d in drains if d.setting == setting]
            problems = [problem for d in mine_drains for problem in d.problems()]
            outcome.problems += problems
            if not problems:
                lines = "; ".join(drain_check_line(d) for d in mine_drains)
                outcome.checks.append(f"{store_label(store)}, delivery alone {setting.limits}: {lines}")
    finally:
        outcome.measurements += measurements
        outcome.drains += drains
    for label, log in logs:
        outcome.problems += [
            f"PowerEmail ({store_label(store)}, {label}) logged: {line}" for line in server_errors(log)[:20]
        ]
    for log in sorted(work.glob("bench-drain-*.log")):
        outcome.problems += [
            f"PowerEmail (delivery alone) logged: {line}" for line in server_errors(log)[:20]
        ]


def profile_cycle(
    base: Server,
    server: Server,
    receiver: Receiver,
    args: argparse.Namespace,
    store: str,
    work: Path,
    outcome: Outcome,
    drains: list[Drain],
) -> list[Measurement]:
    """One more, uncounted cycle with py-spy on delivery alone and on the delivering server."""
    print(f"  {store_label(store)}: profiling {server.setting.label} with py-spy ...", flush=True)
    fill_profiler, alone_profiler = Profiler(server.pid, work), Profiler(0, work)
    wait_for_quiet(args.quiet_wait)
    baseline = measure(base, receiver, args, store, PROFILED, args.duration)
    wait_for_quiet(args.quiet_wait)
    alone = drain_alone(base, server.setting, receiver, args, store, PROFILED, alone_profiler)
    wait_for_quiet(args.quiet_wait)
    delivering = measure(server, receiver, args, store, PROFILED, args.duration, fill_profiler)
    drains.append(alone)
    outcome.profiles[store] = profile_summary(fill_profiler, delivering, alone_profiler, alone)
    return [baseline, delivering]


# --- summary and report -----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One (store, setting): medians over the counted runs."""

    store: str
    setting: Setting
    accepted: float
    baseline: float  # the median acceptance of the same store's api,smtp server
    delivered_in_fill: float
    end_to_end: float
    max_backlog: float
    backlog_at_end: float
    drain_s: float
    cpu_ms: float
    fill_cores: float
    errors: int

    @property
    def ratio(self) -> float:
        return self.accepted / self.baseline if self.baseline else 0.0

    @property
    def keeps_up(self) -> bool:
        return self.delivered_in_fill >= KEEP_UP_SHARE * self.accepted


@dataclass(frozen=True)
class DrainRow:
    """Delivery alone for one (store, setting): medians over the counted runs."""

    store: str
    setting: Setting
    queued: float
    rate: float
    cpu_ms: float
    cores: float
    first_s: float


def summarize_drains(drains: list[Drain], stores: list[str]) -> list[DrainRow]:
    rows = []
    for store in stores:
        counted = [d for d in drains if d.store == store and d.counted]
        for setting in dict.fromkeys(d.setting for d in counted):
            same = [d for d in counted if d.setting == setting]
            rows.append(
                DrainRow(
                    store=store,
                    setting=setting,
                    queued=statistics.median(d.queued for d in same),
                    rate=statistics.median(d.rate for d in same),
                    cpu_ms=statistics.median(d.cpu_ms_per_message for d in same),
                    cores=statistics.median(d.cores for d in same),
                    first_s=statistics.median(d.first_s for d in same),
                )
            )
    return rows


def drain_table(rows: list[DrainRow]) -> str:
    lines = [
        "| store | delivery alone (concurrency/connections) | queue at start | delivered msg/s"
        " | CPU ms/msg | CPU (cores) | start to first delivery (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {store_label(r.store)} | {r.setting.limits} | {r.queued:,.0f} | {r.rate:,.0f}"
            f" | {r.cpu_ms:.2f} | {r.cores:.2f} | {r.first_s:.1f} |"
        )
    return "\n".join(lines)


def drains_table(drains: list[Drain]) -> str:
    lines = [
        "| store | run | delivery alone (concurrency/connections) | queued | delivered | msg/s"
        " | CPU ms/msg | CPU (cores) | start to first delivery (s) | other CPU | check |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for d in drains:
        other = f"**{d.other_cores:.2f}**" if d.noisy else f"{d.other_cores:.2f}"
        ok = "**FAILED**" if d.problems() else "ok"
        lines.append(
            f"| {store_label(d.store)} | {run_label(d.run)} | {d.setting.limits} | {d.queued:,}"
            f" | {d.delivered:,} | {d.rate:,.1f} | {d.cpu_ms_per_message:.2f} | {d.cores:.2f}"
            f" | {d.first_s:.1f} | {other} | {ok} |"
        )
    return "\n".join(lines)


def summarize(measurements: list[Measurement], stores: list[str]) -> list[Row]:
    rows = []
    for store in stores:
        counted = [m for m in measurements if m.store == store and m.counted]
        baselines = [m for m in counted if not m.delivers]
        for setting in dict.fromkeys(m.setting for m in counted):
            same = [m for m in counted if m.setting == setting]
            # The ratio is to the baselines measured in the same cycles (all of them for the baseline row).
            paired = [m.accepted_rate for m in baselines if m.paired == setting.label] or [
                m.accepted_rate for m in baselines
            ]

            def median(values: list[float]) -> float:
                return statistics.median(values) if values else 0.0

            rows.append(
                Row(
                    store=store,
                    setting=setting,
                    accepted=median([m.accepted_rate for m in same]),
                    baseline=median(paired),
                    delivered_in_fill=median([m.delivered_rate_in_fill for m in same]),
                    end_to_end=median([m.end_to_end_rate for m in same]),
                    max_backlog=median([m.max_backlog for m in same]),
                    backlog_at_end=median([m.backlog_at_end for m in same]),
                    drain_s=median([m.drain_s for m in same]),
                    cpu_ms=median([m.cpu_ms_per_message for m in same]),
                    fill_cores=median([m.fill_cores for m in same]),
                    errors=sum(
                        m.error_count for m in measurements if m.store == store and m.setting == setting
                    ),
                )
            )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| store | server | accepted msg/s | vs no delivery | delivered msg/s during fill | end-to-end msg/s"
        " | max backlog | backlog at end of fill | drain (s) | server CPU ms/msg | server CPU during fill"
        " | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        errors = f"**{r.errors}**" if r.errors else "0"
        if r.setting.delivery is None:
            delivery = "- | - | - | - | -"
        else:
            delivery = (
                f"{r.delivered_in_fill:,.0f} | {r.end_to_end:,.0f} | {r.max_backlog:,.0f}"
                f" | {r.backlog_at_end:,.0f} | {r.drain_s:.1f}"
            )
        lines.append(
            f"| {store_label(r.store)} | {r.setting.label} | {r.accepted:,.0f} | {r.ratio:.2f}x | {delivery}"
            f" | {r.cpu_ms:.2f} | {r.fill_cores:.2f} | {errors} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        if r.setting.delivery is None:
            continue
        met = "**met**" if r.keeps_up else "**not met**"
        lines.append(
            f"Target ({store_label(r.store)}, {r.setting.label}: the queue drains as fast as it fills):"
            f" {met};"
            f" {r.delivered_in_fill:,.0f} of {r.accepted:,.0f} msg/s accepted were delivered during the fill"
            f" ({r.delivered_in_fill / r.accepted:.0%}; needed {KEEP_UP_SHARE:.0%}), backlog at its end"
            f" {r.backlog_at_end:,.0f}. Delivering costs acceptance {1 - r.ratio:.0%}"
            f" ({r.accepted:,.0f} vs {r.baseline:,.0f} msg/s without delivery)."
        )
    return lines


def summary_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """The figures bench/run.py puts in its one table (docs/benchmarks/delivery.json)."""
    return [
        {
            "target": f"End to end, {store_label(r.store)}, {r.setting.label}: delivered during the fill",
            "ours": round(r.delivered_in_fill, 1),
            "baseline": round(r.accepted, 1),
            "ratio": round(r.delivered_in_fill / r.accepted, 3) if r.accepted else 0.0,
            "unit": "msg/s (baseline: accepted meanwhile)",
            "goal": f">= {KEEP_UP_SHARE}x",
            "met": r.keeps_up,
        }
        for r in rows
        if r.setting.delivery is not None
    ]


def backlog_timeline(m: Measurement) -> str:
    """The backlog at each whole second of the fill, then the drain's samples."""
    whole = [
        pending for t, pending in m.samples if abs(t - round(t)) < SAMPLE_INTERVAL_S / 2 and t <= m.fill_s
    ]
    return ", ".join(f"{n:,}" for n in whole) or "-"


def runs_table(measurements: list[Measurement]) -> str:
    lines = [
        "| store | run | server | sent | accepted msg/s | delivered in fill | end-to-end msg/s"
        " | backlog each second of the fill | drain (s) | server CPU fill / all (s) | receiver CPU (s)"
        " | client CPU | other CPU | steal | check |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- |",
    ]
    for m in measurements:
        other = f"**{m.other_cores:.2f}**" if m.noisy else f"{m.other_cores:.2f}"
        ok = "ok" if not (m.other_states or m.error_count or m.stored != m.sent) else "**FAILED**"
        if m.delivers:
            if m.delivered != m.sent or (m.received is not None and m.received != m.sent) or not m.drained:
                ok = "**FAILED**"
            delivery = (
                f"{m.delivered_in_fill:,} | {m.end_to_end_rate:,.1f} | {backlog_timeline(m)}"
                f" | {m.drain_s:.2f}"
            )
        else:
            delivery = "- | - | - | -"
        lines.append(
            f"| {store_label(m.store)} | {run_label(m.run)} | {m.setting.label} | {m.sent:,}"
            f" | {m.accepted_rate:,.1f} | {delivery} | {m.server_cpu_fill:.1f} / {m.server_cpu_all:.1f}"
            f" | {m.receiver_cpu:.2f} | {m.client_cores:.2f} | {other} | {m.steal_cores:.2f} | {ok} |"
        )
    return "\n".join(lines)


def noise_note(measurements: list[Measurement], drains: list[Drain]) -> str:
    others = [m.other_cores for m in measurements if m.counted] + [d.other_cores for d in drains if d.counted]
    noisy = [other for other in others if other > NOISY_OTHER_CORES]
    busiest = max(others, default=0.0)
    if noisy:
        return (
            f"**{len(noisy)} of {len(others)} counted measurements saw other processes use more than"
            f" {NOISY_OTHER_CORES} of a core** (bold below; the most: {busiest:.2f} cores): their figures are"
            " lower than a quiet machine's."
        )
    return (
        f"No counted measurement saw other processes use more than {NOISY_OTHER_CORES} of a core"
        f" (the most: {busiest:.2f})."
    )


def quiet_text(args: argparse.Namespace) -> str:
    if not args.quiet_wait:
        return ""
    return f", up to {args.quiet_wait:g} s wait before each measurement for other processes to go idle"


NOTES_START, NOTES_END = "<!-- notes: kept when the benchmark rewrites this file -->", "<!-- /notes -->"


def kept_notes(report: Path) -> str:
    """The hand-written part of an existing report (between the markers), to carry into the new one."""
    text = report.read_text() if report.exists() else ""
    start, end = text.find(NOTES_START), text.find(NOTES_END)
    if start < 0 or end < start:
        return f"\n{NOTES_START}\n{NOTES_END}\n"
    return f"\n{text[start : end + len(NOTES_END)]}\n"


def command_line() -> str:
    """How this benchmark was started, without where its report went."""
    argv, shown = sys.argv[1:], []
    while argv:
        arg = argv.pop(0)
        if arg == "--report":
            argv = argv[1:]
        elif not arg.startswith("--report="):
            shown.append(arg)
    return " ".join(["python bench/delivery.py", *shown])


def render_report(
    args: argparse.Namespace,
    rows: list[Row],
    drain_rows: list[DrainRow],
    outcome: Outcome,
    receiver: Receiver,
    pg_version: str,
    version: str,
) -> str:
    problems = "\n".join(f"- {p}" for p in outcome.problems) or "None."
    checks = "\n".join(f"- {c}" for c in outcome.checks) or "- (no check passed)"
    settings = ", ".join(setting.label for setting in args.delivery)
    profiles = "".join(
        f"\n\n## Profile: {store_label(store)}\n\n{summary}" for store, summary in outcome.profiles.items()
    )
    notes = kept_notes(args.report)
    return f"""# Delivery benchmark (end to end)

Made by `python bench/delivery.py` (see its docstring); rerun it to refresh this file. Not run by CI.
Setup, once per machine (the benchmark does it itself when run as root and smtp-sink is missing):

    {SMTP_SINK_SETUP}

("No configuration" leaves /etc/postfix/main.cf absent, so no Postfix daemon starts on port 25; only
the `smtp-sink` test program is used.)

- Date: {datetime.datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}; PowerEmail at {version}
- Command: `{command_line()}`
- Machine: `nproc` = {len(os.sched_getaffinity(0))}, {cpu_model()}
- Python: {platform.python_version()} ({platform.python_implementation()}), {versions()}{pg_version}
- Parameters: {args.runs} runs x {args.duration:g} s of load per measurement, {args.sessions} sessions \
on reused logged-in connections in {args.client_processes} load-generator process(es) \
(bench/smtp_load.py), 1 KB messages with 1 recipient, AUTH PLAIN, a new SMTP user per measurement; \
{args.warmup:g} s warm-up per server first (not counted){quiet_text(args)}
- Stores: {stores_text(args.database_url)}; each server has a store of its own
- Servers: `poweremail serve --roles api,smtp` (no delivery: the baseline), and for each delivery
  setting ({settings}: `--delivery-concurrency` / `--max-connections-per-destination`)
  `poweremail serve --roles api,smtp,delivery --relay 127.0.0.1:PORT --relay-tls none`; all with
  `--max-connections-per-address 1000 --log-level WARNING`. One process each, one event loop: the SMTP
  server and the delivery worker share it (and the GIL with the store's threads).
  "in a 2nd process": the same with `--workers 1 --delivery-workers 1`: delivery in a process of its
  own beside the one serving the API and SMTP (`--delivery C:N:separate`; their CPU added up).
- One delivering server at a time (started for its setting, a store of its own), beside the baseline.
  Each run, in this order: the baseline under the load; then *delivery alone*: a `poweremail serve
  --roles delivery` node (same flags) started on the baseline's store, timed while it empties the queue
  the baseline filled, and stopped; then the delivering server under the load.
- Receiver: {receiver.describe()}, on the same machine.

"accepted" is 2xx replies to the final dot per second of load; "vs no delivery" that rate over the
median of the baselines measured in the same runs. "delivered during fill" counts recipients whose
`recipients.last_attempt_at` (state delivered) falls before the load's last reply; "end-to-end" is all
delivered / (last delivered - first `messages.accepted_at`). The backlog is the store's recipients in state
queued or deferred, read every 0.5 s straight from the store; "backlog at end of fill" is the read right
after the load's last reply; "drain" the time from that reply to the last delivery. "server CPU ms/msg"
is the server's CPU (with its PostgreSQL backends) from the start of the load to the empty queue, per
accepted message; "server CPU during fill" in cores (near 1.00: CPU-bound, one Python process).
Medians over the runs.

{table(rows)}

{chr(10).join(verdicts(rows))}

Delivery alone (no acceptance in the same process): how fast a `--roles delivery` node empties the
queue the baseline filled, from its first delivery to its last (store timestamps); its CPU (with its
PostgreSQL backends) per message and in cores over that time.

{drain_table(drain_rows)}
{notes}
## Checks

{checks}

## Failures

{problems}

## Every measurement

"backlog each second of the fill" is the read nearest each whole second. The CPU columns: the server
(fill / fill and drain, seconds, with PostgreSQL backends), the receiver, the load generator (cores),
other processes (cores: noise), and steal. {noise_note(outcome.measurements, outcome.drains)}

{runs_table(outcome.measurements)}

Delivery alone, each run:

{drains_table(outcome.drains)}{profiles}
"""


# --- main -------------------------------------------------------------------------------------


def parse_delivery(value: str) -> Setting:
    parts = value.split(":")
    separate = len(parts) == 3 and parts[2] == "separate"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not separate):
        raise argparse.ArgumentTypeError(f"expected CONCURRENCY:CONNECTIONS[:separate], not {value!r}")
    if not all(part.isdigit() and int(part) >= 1 for part in parts[:2]):
        raise argparse.ArgumentTypeError(f"CONCURRENCY and CONNECTIONS must be numbers >= 1, not {value!r}")
    return Setting((int(parts[0]), int(parts[1])), separate)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=3, help="runs; each measures every server once (default 3)"
    )
    parser.add_argument(
        "--duration", type=float, default=10, help="seconds of load per measurement (default 10)"
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
        help="seconds of uncounted load per server before the runs (default 1)",
    )
    parser.add_argument(
        "--database-url",
        action="append",
        metavar="URL",
        help="the store: 'sqlite' (the default) or postgresql://USER@HOST:PORT/DB, whose server gets a fresh"
        " database per PowerEmail server, dropped after; repeat to measure several stores",
    )
    parser.add_argument(
        "--delivery",
        action="append",
        type=parse_delivery,
        metavar="CONCURRENCY:CONNECTIONS",
        help="--delivery-concurrency and --max-connections-per-destination of a delivering server; repeat to"
        " compare several (default 50:10, the server's defaults)",
    )
    parser.add_argument(
        "--receiver",
        choices=["smtp-sink", "bare"],
        default="smtp-sink",
        help="smtp-sink (installed if missing, as root), or bench/bare_smtp.py (default smtp-sink)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=300,
        help="seconds to wait for the queue to empty (default 300)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each measurement, wait up to SECONDS for other processes to leave the machine idle",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one extra delivery run per store (py-spy)"
    )
    parser.add_argument(
        "--report", type=Path, default=REPORT_PATH, help=f"markdown output (default {REPORT_PATH})"
    )
    args = parser.parse_args()
    args.database_url = args.database_url or [SQLITE]
    args.delivery = args.delivery or [Setting(SERVER_DEFAULTS)]
    for url in args.database_url:
        if url != SQLITE and make_url(url).get_backend_name() not in ("postgresql", "postgres"):
            parser.error(f"--database-url must be 'sqlite' or a postgresql:// URL, not {url!r}")
    if min(args.runs, args.sessions, args.client_processes) < 1 or min(args.duration, args.warmup) <= 0:
        parser.error("--runs, --sessions and --client-processes must be >= 1; --duration and --warmup > 0")
    if args.client_processes > args.sessions:
        parser.error("--client-processes cannot exceed --sessions")
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy: pip install py-spy")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def benchmark(args: argparse.Namespace, work: Path, receiver: Receiver) -> Outcome:
    outcome = Outcome()

    def receiver_ready() -> bool:
        return greets(receiver.port)

    with running(receiver.command, receiver.log, receiver_ready) as process:
        receiver.pid = process.pid
        for index, store in enumerate(args.database_url):
            print(
                f"{store_label(store)}: {args.runs} runs x {1 + len(args.delivery)} servers"
                f" x {args.duration:g} s, {args.sessions} sessions",
                flush=True,
            )
            bench_store(store, args, work, receiver, outcome, index)
    if receiver.kind == "bare":
        outcome.problems += [f"bare receiver logged: {line}" for line in server_errors(receiver.log)[:20]]
    return outcome


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    kind = args.receiver
    if kind == "smtp-sink" and find_smtp_sink() is None and install_smtp_sink() is None:
        print(
            "smtp-sink is not available and could not be installed: bench/bare_smtp.py receives instead",
            flush=True,
        )
        kind = "bare"
    pg_version = postgres_version(args.database_url)
    version = source_version()
    print(f"PowerEmail at {version}", flush=True)
    with tempfile.TemporaryDirectory(prefix="poweremail-delivery-bench-") as tmp:
        receiver = Receiver(kind, Path(tmp))
        outcome = benchmark(args, Path(tmp), receiver)
    if (version_after := source_version()) != version:
        outcome.problems.append(f"the source changed during the benchmark ({version} -> {version_after})")
    rows = summarize(outcome.measurements, args.database_url)
    drain_rows = summarize_drains(outcome.drains, args.database_url)
    return publish(
        args.report,
        report=render_report(args, rows, drain_rows, outcome, receiver, pg_version, version),
        summary=summary_rows(rows),
        tables=f"{table(rows)}\n\n{drain_table(drain_rows)}",
        lines=[*verdicts(rows), *outcome.checks],
        profiles=outcome.profiles,
        problems=outcome.problems,
        note=noise_note(outcome.measurements, outcome.drains),
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench/delivery.py: interrupted", file=sys.stderr)
        sys.exit(130)
