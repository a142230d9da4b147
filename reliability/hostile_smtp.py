"""Hostile SMTP input, the long run (issue 6, item 4): many more generated sessions than CI plays.

    .venv/bin/python reliability/hostile_smtp.py [--minutes 10] [--backend sqlite] [--backend postgresql]
                                                 [--chunk 200] [--no-shrink]

For each backend, starts ``poweremail serve`` on free loopback ports with a fresh store (SQLite in a
temporary directory; PostgreSQL: a new database on POWEREMAIL_TEST_DATABASE_URL, default
postgresql://postgres@127.0.0.1:5432/test, dropped afterwards) and a small --max-message-size, then
for ``--minutes`` (shared between the backends) lets Hypothesis draw examples — an SMTP user's limits
and up to three sessions of valid and mangled commands, payloads and raw bytes — and plays each over
real sockets, checking every reply against the model in tests/smtp/hostile.py, then the store, then
that a fresh normal session still sends a message. Hypothesis runs in chunks of ``--chunk`` examples,
each with a new random seed, until the time is up.

Prints, per backend: examples, sessions, commands and data octets sent, messages accepted, refusals
by reply code, crashes (server died, a normal session failed, or an ERROR/traceback in its log), model
violations (a reply the model does not allow, including anything accepted that must be refused),
and the server's resident memory at start, at the end and at its peak (VmHWM). On a violation
Hypothesis shrinks it (unless --no-shrink) and the falsifying example is printed. Exits 1 if any
crash or violation. Loopback only; nothing outside the temporary directory and the test database.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.* helpers

from hypothesis import HealthCheck, Phase, given, settings
from tests.smtp.helpers import add_smtp_user, tls_context_trusting
from tests.smtp.hostile import Example, ModelViolation, Stats, Target, examples, run_example, send_normally
from tests.support import (
    ServerProcess,
    create_owner,
    create_postgres_database,
    drop_postgres_database,
    run,
)

MAX_SIZE = 8192
MIB = 1024 * 1024


@dataclass
class Outcome:
    backend: str
    stats: Stats = field(default_factory=Stats)
    seconds: float = 0.0
    chunks: int = 0
    store_away: int = 0  # chunks cut short because PostgreSQL had no connection left
    crashes: int = 0
    violations: int = 0
    first_failure: str = ""
    memory: dict[str, int] = field(default_factory=dict)


def _memory(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


# The PostgreSQL server is shared: when others' work takes all its connections, the store is simply
# not there for a while. That is no answer to hostile input; such a chunk is played again later.
_STORE_AWAY = ("too many clients", "TooManyConnections")


def _log_errors(server: ServerProcess) -> list[str]:
    """The log records at ERROR or with a traceback, but for the store being out of connections."""
    records: list[str] = []
    for line in server.log().splitlines():
        if line[:4].isdigit() or not records:  # a record starts with its timestamp
            records.append(line)
        else:
            records[-1] += "\n" + line
    return [
        record
        for record in records
        if (" ERROR " in record or "Traceback" in record) and not any(m in record for m in _STORE_AWAY)
    ]


def run_backend(backend: str, *, seconds: float, chunk: int, shrink: bool) -> Outcome:
    outcome = Outcome(backend)
    with tempfile.TemporaryDirectory(prefix="poweremail-hostile-") as tmp:
        directory = Path(tmp)
        url = (
            f"sqlite:///{directory / 'db.sqlite3'}"
            if backend == "sqlite"
            else run(create_postgres_database())
        )
        server = ServerProcess(
            data_dir=directory / "data",
            database_url=url,
            log_path=directory / "serve.log",
            extra_args=(
                "--max-message-size", str(MAX_SIZE),
                "--failed-logins-per-address", "100000",
                "--failed-login-delay", "0",
                "--log-level", "WARNING",
            ),
        ).start()  # fmt: skip
        try:
            assert server.process is not None
            pid = server.process.pid
            outcome.memory["start"] = _memory(pid)["VmRSS"]
            owner = create_owner(url)
            canary = add_smtp_user(server, owner, total_limit=2_000_000_000, hourly_limit=2_000_000_000)
            target = Target(server.smtp_port, server.smtps_port, MAX_SIZE, tls_context_trusting(server), url)
            phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]

            @settings(
                max_examples=chunk,
                deadline=None,
                database=None,
                phases=phases,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(example=examples())
            def play(example: Example) -> None:
                user = add_smtp_user(
                    server, owner, total_limit=example.total_limit, hourly_limit=example.hourly_limit
                )
                run_example(target, example, user, outcome.stats)
                if server.process is None or server.process.poll() is not None:
                    raise ModelViolation("the server died")
                send_normally(target, canary, timeout=15)

            started = time.monotonic()
            while time.monotonic() - started < seconds:
                outcome.chunks += 1
                log_from = len(server.log())
                try:
                    play()
                except Exception as failure:
                    seen = "".join(traceback.format_exception(failure)) + server.log()[log_from:]
                    if any(m in seen for m in _STORE_AWAY):
                        outcome.store_away += 1
                        print(
                            f"[{backend}] PostgreSQL out of connections; waiting, then going on", flush=True
                        )
                        time.sleep(15)
                        continue
                    died = server.process.poll() is not None
                    outcome.crashes += int(died)
                    outcome.violations += int(not died)
                    outcome.first_failure = "".join(traceback.format_exception_only(failure))
                    print(f"[{backend}] FAILED:\n{''.join(traceback.format_exception(failure))}", flush=True)
                    break
                print(
                    f"[{backend}] {time.monotonic() - started:6.0f} s: {outcome.stats.examples} examples,"
                    f" RSS {_memory(pid)['VmRSS'] / MIB:.1f} MiB",
                    flush=True,
                )
            outcome.seconds = time.monotonic() - started
            errors = _log_errors(server)
            if errors:
                outcome.crashes += 1
                outcome.first_failure = outcome.first_failure or "\n".join(errors[:10])
            if server.process.poll() is None:
                memory = _memory(pid)
                outcome.memory["end"], outcome.memory["peak"] = memory["VmRSS"], memory["VmHWM"]
        finally:
            server.stop()
            if backend == "postgresql":
                run(drop_postgres_database(url))
    return outcome


def report(outcome: Outcome) -> str:
    stats = outcome.stats
    refused = ", ".join(f"{code}: {count}" for code, count in sorted(stats.refused.items()))
    memory = ", ".join(f"{key} {value / MIB:.1f} MiB" for key, value in outcome.memory.items())
    return "\n".join(
        [
            f"backend {outcome.backend}: {outcome.seconds:.0f} s, {outcome.chunks} Hypothesis runs"
            + (
                f" ({outcome.store_away} cut short: PostgreSQL out of connections)"
                if outcome.store_away
                else ""
            ),
            f"  inputs tried: {stats.examples} examples, {stats.sessions} sessions,"
            f" {stats.commands} command lines, {stats.data_bytes} data octets",
            f"  messages accepted (each checked in the store): {stats.accepted}",
            f"  refusals by code: {refused}",
            f"  crashes: {outcome.crashes}",
            f"  wrongly accepted or otherwise off the model: {outcome.violations}",
            f"  server RSS: {memory}",
            *([f"  first failure: {outcome.first_failure.strip()}"] if outcome.first_failure else []),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total time, shared between backends")
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgresql"], help="default: both")
    parser.add_argument("--chunk", type=int, default=200, help="examples per Hypothesis run")
    parser.add_argument("--no-shrink", action="store_true", help="report a failure as found, unshrunk")
    args = parser.parse_args()
    backends = args.backend or ["sqlite", "postgresql"]
    outcomes = [
        run_backend(
            backend, seconds=args.minutes * 60 / len(backends), chunk=args.chunk, shrink=not args.no_shrink
        )
        for backend in backends
    ]
    print()
    for outcome in outcomes:
        print(report(outcome))
    return 1 if any(o.crashes or o.violations for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
