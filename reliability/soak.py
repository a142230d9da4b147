"""Soak (issue 6, item 7): minutes of mixed API and SMTP traffic with deliveries, sampled every 10 s.

    .venv/bin/python reliability/soak.py [--minutes 10] [--backend sqlite|postgresql]
                                         [--senders 3] [--rate 1.0] [--api-rate 4.0]

Starts ``poweremail serve`` with every role (api, smtp, delivery) on free loopback ports, node name
``soak``, a fresh store (SQLite in a temporary directory; PostgreSQL: a new database on
POWEREMAIL_TEST_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/test, dropped afterwards),
relaying everything to a recording Receiver on loopback (tests/delivery/receiver.py). Then, for
``--minutes``, a steady load at a fixed pace:

- ``--senders`` SMTP sessions, each sending ``--rate`` letters a second (1-3 recipients each) and
  starting a new session (connect, EHLO, AUTH PLAIN) every 10 letters;
- one API client making ``--api-rate`` calls a second, in turn: listSmtp and listMessages (the sending
  user), editSmtp (the sending user, writing its limits again), and the life of a throw-away SMTP user
  of a second owner: addSmtp, editSmtp, resetSmtpPassword, deleteSmtp (so the store's users do not pile
  up and listSmtp stays the same size).

Every 10 s it samples: the server's resident memory (VmRSS, summed over its process tree), its open
file descriptors (/proc/PID/fd), the queue depth (recipients queued or deferred in the store), letters
answered 250, recipients delivered (in the store), and errors: any SMTP reply other than the expected
one (220, 250, 235, 354, 221) or a broken session, any API answer other than HTTP 200, any ERROR line or
traceback in the server's log. After the load it waits (at most 60 s) for the queue to drain.

Prints every sample, then a table (start, middle, end, and the slope per minute over the second half)
and exits 1 if any error, or if, from the middle sample to the end:

- memory grew by more than max(10 % of the middle value, 10 MiB);
- open files grew by more than 8;
- the queue grew by more than 20 recipients;

or if the queue did not drain afterwards, or the relay did not get every accepted recipient once.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.* helpers

import httpx
import sqlalchemy as sa
from sqlalchemy import Connection
from tests.delivery.helpers import FAST_DELIVERY
from tests.delivery.receiver import Receiver
from tests.smtp.helpers import SmtpUser, add_smtp_user
from tests.smtp.letters import QUEUED_PREFIX, Letter
from tests.smtp.raw import RawSMTP
from tests.support import (
    Owner,
    ServerProcess,
    create_owner,
    create_postgres_database,
    drop_postgres_database,
    run,
    store_read,
)

from poweremail.store.schema import recipients

LIMIT = 1_000_000
SAMPLE_EVERY = 10.0  # seconds
LETTERS_PER_SESSION = 10
DRAIN_BOUND = 60.0
MIB = 1024 * 1024
# Tolerances, from the middle sample to the end (see the docstring).
RSS_TOLERANCE = (0.10, 10 * MIB)
FD_TOLERANCE = 8
QUEUE_TOLERANCE = 20


# --- the load ---------------------------------------------------------------------------------------


@dataclass
class Counts:
    lock: threading.Lock = field(default_factory=threading.Lock)
    letters: int = 0  # answered 250 after DATA
    recipients: int = 0  # of those letters
    sessions: int = 0
    api_calls: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {what}")


class Load:
    def __init__(
        self, node: ServerProcess, owner: Owner, user: SmtpUser, churn_owner: Owner, args: argparse.Namespace
    ) -> None:
        self.node, self.owner, self.user, self.churn_owner = node, owner, user, churn_owner
        self.senders, self.rate, self.api_rate = args.senders, args.rate, args.api_rate
        self.counts = Counts()
        self._stop = threading.Event()
        self._threads = [
            *(
                threading.Thread(target=self._guarded, args=(self._send, n), daemon=True)
                for n in range(self.senders)
            ),
            threading.Thread(target=self._guarded, args=(self._call_api, 0), daemon=True),
        ]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _guarded(self, target: Callable[[int], None], n: int) -> None:
        try:
            target(n)
        except BaseException as error:  # a bug in the load, counted as an error: the run must fail
            self.counts.error(f"load thread failed: {error!r}")

    # SMTP senders

    def _send(self, sender: int) -> None:
        interval = 1.0 / self.rate
        due = time.monotonic() + sender * interval / self.senders  # spread the senders over the interval
        sizes = itertools.count(sender)
        while not self._stop.is_set():
            try:
                with RawSMTP(self.node.smtp_port, timeout=30) as client:
                    due = self._session(client, sizes, due, interval)
            except OSError as error:
                self.counts.error(f"sender {sender}: {error!r}")
                self._stop.wait(1)
                due = time.monotonic()

    def _session(self, client: RawSMTP, sizes: itertools.count[int], due: float, interval: float) -> float:
        def expect(reply: str, code: str, what: str) -> bool:
            if reply.startswith(code):
                return True
            self.counts.error(f"SMTP {what}: {reply!r}")
            return False

        with self.counts.lock:
            self.counts.sessions += 1
        if not expect(client.greeting, "220", "greeting"):
            return due
        if not expect(client.login(self.user.name, self.user.password), "235", "AUTH"):
            return due
        for _ in range(LETTERS_PER_SESSION):
            if self._stop.wait(max(0.0, due - time.monotonic())):
                break
            due = max(due + interval, time.monotonic() - interval)
            letter = Letter.to(1 + next(sizes) % 3)
            if not expect(client.command("MAIL FROM:<sender@example.com>"), "250", "MAIL"):
                return due
            for address in letter.recipients:
                if not expect(client.command(f"RCPT TO:<{address}>"), "250", "RCPT"):
                    return due
            if not expect(client.command("DATA"), "354", "DATA"):
                return due
            if not expect(client.command(letter.content() + b"\r\n."), QUEUED_PREFIX, "end of DATA"):
                return due
            with self.counts.lock:
                self.counts.letters += 1
                self.counts.recipients += len(letter.recipients)
        expect(client.command("QUIT"), "221", "QUIT")
        return due

    # API client

    def _call_api(self, _: int) -> None:
        interval = 1.0 / self.api_rate
        calls = itertools.cycle(
            [
                "listSmtp",
                "listMessages",
                "editSmtp",
                "addSmtp",
                "editSmtp*",
                "resetSmtpPassword*",
                "deleteSmtp*",
            ]
        )
        churn_user = ""
        due = time.monotonic()
        with httpx.Client(base_url=self.node.base_url, timeout=30) as http:
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                due = max(due + interval, time.monotonic() - interval)
                call = next(calls)
                if call.endswith("*"):  # the throw-away user of the second owner
                    call = call[:-1]
                    body = self.churn_owner.creds(smtp_user_name=churn_user)
                elif call == "addSmtp":
                    body = self.churn_owner.creds()
                else:
                    body = self.owner.creds()
                    if call != "listSmtp":
                        body["smtp_user_name"] = self.user.name
                if call == "addSmtp":
                    body.update(total_limit=100, hourly_limit=10)
                elif call == "editSmtp":
                    if body["owner_id"] == self.churn_owner.owner_id:
                        body.update(total_limit=200, hourly_limit=20, status="Disable")
                    else:  # the sending user's own limits, written again
                        body.update(total_limit=LIMIT, hourly_limit=LIMIT)
                elif call == "listMessages":
                    body["limit"] = 20
                try:
                    response = http.post(f"/settings/{call}", json=body)
                except httpx.HTTPError as error:
                    self.counts.error(f"API {call}: {error!r}")
                    continue
                if response.status_code != 200:
                    self.counts.error(f"API {call}: HTTP {response.status_code} {response.text[:200]}")
                    continue
                if call == "addSmtp":
                    churn_user = response.json()["smtp_user_name"]
                with self.counts.lock:
                    self.counts.api_calls[call] += 1


# --- sampling ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    seconds: float
    rss: int  # bytes, the server's process tree
    fds: int
    queue: int  # recipients queued or deferred
    letters: int  # answered 250
    delivered: int  # recipients delivered (store)
    errors: int


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _states(conn: Connection) -> dict[str, int]:
    rows = conn.execute(sa.select(recipients.c.state, sa.func.count()).group_by(recipients.c.state)).all()
    return {row[0]: row[1] for row in rows}


class LogWatch:
    """ERROR records and tracebacks in the server's log, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.found: list[str] = []

    def scan(self) -> list[str]:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            chunk = log.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line:
                self.found.append(line)
        return self.found


def sample(node: ServerProcess, database_url: str, started: float, load: Load, log: LogWatch) -> Sample:
    assert node.process is not None
    pids = _tree(node.process.pid)
    states = store_read(database_url, _states)
    with load.counts.lock:
        letters, errors = load.counts.letters, len(load.counts.errors)
    return Sample(
        seconds=time.monotonic() - started,
        rss=sum(_rss(pid) for pid in pids),
        fds=sum(_fds(pid) for pid in pids),
        queue=states.get("queued", 0) + states.get("deferred", 0),
        letters=letters,
        delivered=states.get("delivered", 0),
        errors=errors + len(log.scan()),
    )


def _slope(samples: list[Sample], value: str) -> float:
    """Least squares, per minute."""
    xs = [s.seconds / 60 for s in samples]
    ys = [float(getattr(s, value)) for s in samples]
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def _row(label: str, s: Sample) -> str:
    return (
        f"| {label:<19} | {s.seconds:7.0f} | {s.rss / MIB:8.1f} | {s.fds:5d} | {s.queue:5d} "
        f"| {s.letters:9d} | {s.delivered:9d} | {s.errors:6d} |"
    )


def table(samples: list[Sample]) -> str:
    start, middle, end = samples[0], samples[len(samples) // 2], samples[-1]
    half = samples[len(samples) // 2 :]
    slope = (
        f"| {'slope/min, 2nd half':<19} | {'':>7} | {_slope(half, 'rss') / MIB:+8.2f} "
        f"| {_slope(half, 'fds'):+5.1f} | {_slope(half, 'queue'):+5.1f} "
        f"| {_slope(half, 'letters'):+9.0f} | {_slope(half, 'delivered'):+9.0f} "
        f"| {_slope(half, 'errors'):+6.1f} |"
    )
    return "\n".join(
        [
            "| sample              | seconds | RSS MiB  |  fds  | queue | accepted  | delivered | errors |",
            "|                     |         |          |       | rcpts | letters   | rcpts     |        |",
            "|---------------------|---------|----------|-------|-------|-----------|-----------|--------|",
            _row("start", start),
            _row("middle", middle),
            _row("end", end),
            slope,
        ]
    )


# --- the run ----------------------------------------------------------------------------------------


def soak(args: argparse.Namespace, directory: Path) -> list[str]:
    database_url = (
        f"sqlite:///{directory / 'poweremail.sqlite3'}"
        if args.backend == "sqlite"
        else run(create_postgres_database())
    )
    problems: list[str] = []
    samples: list[Sample] = []
    try:
        with Receiver() as relay:
            node = ServerProcess(
                data_dir=directory / "data",
                database_url=database_url,
                log_path=directory / "serve.log",
                roles="api,smtp,delivery",
                extra_args=(
                    "--node-name", "soak", *FAST_DELIVERY, "--relay", relay.address, "--relay-tls", "none",
                ),
            ).start()  # fmt: skip
            try:
                owner, churn_owner = create_owner(database_url), create_owner(database_url)
                user = add_smtp_user(node, owner, total_limit=LIMIT, hourly_limit=LIMIT)
                log = LogWatch(node.log_path)
                load = Load(node, owner, user, churn_owner, args)
                started = time.monotonic()
                samples.append(sample(node, database_url, started, load, log))
                print(_row("sample", samples[-1]), flush=True)
                load.start()
                until = started + args.minutes * 60
                while time.monotonic() < until - 1:
                    time.sleep(max(0.0, min(until, started + len(samples) * SAMPLE_EVERY) - time.monotonic()))
                    samples.append(sample(node, database_url, started, load, log))
                    print(_row("sample", samples[-1]), flush=True)
                    if node.process is not None and node.process.poll() is not None:
                        problems.append(f"the server exited ({node.process.returncode})")
                        break
                load.stop()
                stopped = time.monotonic()
                drained = None
                while time.monotonic() - stopped < DRAIN_BOUND:
                    states = store_read(database_url, _states)
                    if not states.get("queued", 0) + states.get("deferred", 0):
                        drained = time.monotonic() - stopped
                        break
                    time.sleep(0.2)
                final = sample(node, database_url, started, load, log)
            finally:
                node.stop()
            relayed = Counter(address for message in relay.messages for address in message.rcpt_tos)
    finally:
        if args.backend == "postgresql":
            run(drop_postgres_database(database_url))

    counts = load.counts
    print()
    print(
        f"soak, {args.backend}, {args.minutes:g} min: {args.senders} SMTP senders x {args.rate:g} letters/s,"
        f" {args.api_rate:g} API calls/s; {counts.sessions} SMTP sessions, {counts.letters} letters"
        f" ({counts.recipients} recipients) answered 250, API calls {dict(counts.api_calls)}"
    )
    print(table(samples))
    print(
        f"after the load: queue drained in {'-' if drained is None else f'{drained:.1f} s'};"
        f" delivered {final.delivered} of {counts.recipients} accepted recipients;"
        f" relay got {sum(relayed.values())} ({sum(c - 1 for c in relayed.values() if c > 1)} twice);"
        f" server log ERROR/traceback lines {len(log.found)}"
    )
    errors = counts.errors + log.found
    if errors:
        problems.append(f"{len(errors)} errors, first: {errors[:5]}")
    middle, end = samples[len(samples) // 2], samples[-1]
    rss_allowed = max(RSS_TOLERANCE[0] * middle.rss, RSS_TOLERANCE[1])
    if end.rss - middle.rss > rss_allowed:
        problems.append(f"memory grew {(end.rss - middle.rss) / MIB:.1f} MiB > {rss_allowed / MIB:.1f} MiB")
    if end.fds - middle.fds > FD_TOLERANCE:
        problems.append(f"open files grew {end.fds - middle.fds} > {FD_TOLERANCE}")
    if end.queue - middle.queue > QUEUE_TOLERANCE:
        problems.append(f"queue grew {end.queue - middle.queue} > {QUEUE_TOLERANCE}")
    if drained is None:
        problems.append(f"queue not drained within {DRAIN_BOUND:.0f} s of the load's end")
    relayed_total = sum(relayed.values())
    if not final.delivered == relayed_total == len(relayed) == counts.recipients:
        problems.append(
            f"delivery: {final.delivered} delivered, {sum(relayed.values())} relayed,"
            f" {counts.recipients} accepted"
        )
    print(
        f"tolerances (middle to end): memory max(10 %, 10 MiB) = {rss_allowed / MIB:.1f} MiB,"
        f" open files {FD_TOLERANCE}, queue {QUEUE_TOLERANCE} recipients; errors 0"
    )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1.0, help="letters a second per SMTP sender")
    parser.add_argument("--api-rate", type=float, default=4.0, help="API calls a second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"soak-{args.backend}-") as directory:
        problems = soak(args, Path(directory))
    if problems:
        print(f"FAILED: {'; '.join(problems)}")
        return 1
    print("OK: flat, zero errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
