"""Paired A/B runs of SMTP acceptance: is a change faster than what it changes, on this machine, now?

    python bench/paired.py [--base REV] [--args "SERVE FLAGS"] [--base-args "SERVE FLAGS"]
                           [--pairs 6] [--duration 8] [--mode reused|new] [--size 1KB|100KB]
                           [--sessions 20] [--database-url URL] [--no-deliver]

Side A is the working tree (``src/``), side B the source of ``--base`` (a git revision, default HEAD,
taken out with ``git archive``; ``--base .`` is the working tree again, to compare serve flags alone:
``--base . --args "--workers 1 --delivery-workers 1"``). Each pair measures both sides one after the
other, in alternating order (AB, BA, AB, ...), each on a fresh ``poweremail serve`` with a fresh store,
under the load of bench/smtp.py (bench/smtp_load.py, a new SMTP user per measurement) and, unless
``--no-deliver``, with delivery relaying everything to Postfix's smtp-sink meanwhile, as issue 5's
target 1 asks.

Why pairs: bench/smtp.py's ratios move by ±20% between runs minutes apart on a shared 2-core machine
(the bare server is pure CPU; PowerEmail also waits on fsync). Two versions measured back to back
share the machine's mood; the median of the pairs' ratios, and how many pairs A won, say whether a
change pays. Every change kept for speed in issue 5 was decided this way. Prints one line per
measurement and a summary; exits 1 if a measurement had errors or a server logged one.

It counts accepted mail only. A change to delivery can raise that by letting the queue fall behind
(delivery gathering 50 ms instead of 10: +8.4% here, while bench/delivery.py saw the backlog grow to
hundreds of messages; reverted): check such a change with bench/delivery.py as well.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _receiver import SMTP_SINK_SETUP, Receiver, find_smtp_sink, install_smtp_sink
from _servers import REPO_ROOT, free_port, running  # bench/ is on sys.path: scripts run as python bench/X.py

from smtp import (
    POWEREMAIL,
    SIZES,
    SQLITE,
    Load,
    Measurement,
    PowerEmailApi,
    Target,
    api_answers,
    create_owner,
    greets,
    progress_line,
    run_load,
    serve_command,
    server_errors,
    store_url,
)


@dataclass(frozen=True)
class Side:
    name: str  # "A" or "B"
    src: Path  # the source tree the server imports
    serve_args: list[str]
    describe: str


@contextlib.contextmanager
def importing(src: Path) -> Iterator[None]:
    """Children started in the block import PowerEmail from ``src`` (PYTHONPATH comes before the
    editable install's path entry; a PYTHONPATH already set, say for a sitecustomize that
    instruments the server, stays after it); the load generators, started outside, do not need it."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(src), *([before] if before else [])])
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def checkout(rev: str, into: Path) -> Path:
    """``rev``'s src/ under ``into``; '.' is the working tree itself."""
    if rev == ".":
        return REPO_ROOT / "src"
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def describe_rev(rev: str) -> str:
    if rev == ".":
        return "the working tree"
    done = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %s", rev], capture_output=True, text=True
    )
    return done.stdout.strip() or rev


def measure_side(
    side: Side, args: argparse.Namespace, work: Path, receiver: Receiver | None, run: int
) -> Measurement:
    """A fresh server of ``side`` on a fresh store, one measurement, stopped; its error lines raise."""
    data_dir = work / f"{side.name}-{run}"
    log_path = data_dir.with_suffix(".log")
    with importing(side.src), store_url(args.store, data_dir) as (database_url, database_name):
        owner = create_owner(data_dir, database_url)
        api_port, smtp_port, smtps_port = free_port(), free_port(), free_port()
        serve = serve_command(
            data_dir, database_url, api_port=api_port, smtp_port=smtp_port, smtps_port=smtps_port,
            receiver=receiver, extra=side.serve_args,
        )  # fmt: skip
        with running(serve, log_path, lambda: greets(smtp_port) and api_answers(api_port)) as server:
            api = PowerEmailApi(api_port, owner)
            try:
                target = Target(POWEREMAIL, smtp_port, server.pid, api.add_smtp_user, database_name)
                load = Load(args.mode, args.size, args.sessions, args.duration, 1)
                measurement = run_load(target, load, store=args.store, run=run)
            finally:
                api.close()
        if errors := server_errors(log_path):
            raise RuntimeError(f"side {side.name} logged: {errors[0]}")
    if measurement.errors:
        raise RuntimeError(f"side {side.name}: {measurement.error_count} errors {measurement.errors}")
    return measurement


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="side B's git revision ('.': the working tree)")
    parser.add_argument("--args", default="", help="extra `serve` flags for side A")
    parser.add_argument("--base-args", default="", help="extra `serve` flags for side B")
    parser.add_argument("--pairs", type=int, default=6, help="pairs of measurements (default 6)")
    parser.add_argument("--duration", type=float, default=8, help="seconds a measurement (default 8)")
    parser.add_argument("--mode", choices=("reused", "new"), default="reused")
    parser.add_argument("--size", choices=[s.replace(" ", "") for s in SIZES], default="1KB")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--database-url", dest="store", default=SQLITE, help="'sqlite' or postgresql://...")
    parser.add_argument("--no-deliver", dest="deliver", action="store_false", help="no delivery meanwhile")
    args = parser.parse_args()
    args.size = args.size.replace("KB", " KB")
    if args.pairs < 1 or args.duration <= 0 or args.sessions < 1:
        parser.error("--pairs and --sessions must be >= 1, --duration > 0")
    if args.deliver and find_smtp_sink() is None and install_smtp_sink() is None:
        parser.error(f"delivery needs Postfix's smtp-sink; install it as root: {SMTP_SINK_SETUP}")
    return args


def summary(rates: dict[str, list[float]]) -> list[str]:
    ratios = [a / b for a, b in zip(rates["A"], rates["B"], strict=True) if b > 0]
    wins = sum(1 for a, b in zip(rates["A"], rates["B"], strict=True) if a > b)
    return [
        f"A median {statistics.median(rates['A']):8.1f} msg/s"
        f"   B median {statistics.median(rates['B']):8.1f} msg/s",
        f"A/B: median of the pairs' ratios {statistics.median(ratios):.3f}"
        f" (from {min(ratios):.3f} to {max(ratios):.3f}); A ahead in {wins} of {len(ratios)} pairs",
    ]


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="poweremail-paired-") as tmp:
        work = Path(tmp)
        sides = {
            "A": Side("A", REPO_ROOT / "src", shlex.split(args.args), "the working tree"),
            "B": Side("B", checkout(args.base, work), shlex.split(args.base_args), describe_rev(args.base)),
        }
        for side in sides.values():
            print(f"{side.name}: {side.describe}  serve flags: {' '.join(side.serve_args) or '(none)'}")
        print(f"{args.pairs} pairs x {args.duration:g} s, {args.mode} {args.size}, {args.sessions} sessions,"
              f" {args.store}, delivery {'to smtp-sink' if args.deliver else 'off'}", flush=True)  # fmt: skip
        rates: dict[str, list[float]] = {"A": [], "B": []}
        with contextlib.ExitStack() as stack:
            receiver = None
            if args.deliver:
                receiver = Receiver("smtp-sink", work)
                sink = stack.enter_context(
                    running(receiver.command, receiver.log, lambda: greets(receiver.port))
                )
                receiver.pid = sink.pid
            for pair in range(1, args.pairs + 1):
                order = "AB" if pair % 2 else "BA"
                for name in order:
                    m = measure_side(sides[name], args, work, receiver, pair)
                    rates[name].append(m.rate)
                    print(f"  pair {pair} {name}: {progress_line(m)}", flush=True)
    print()
    for line in summary(rates):
        print(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as failure:
        print(f"FAILURE: {failure}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
