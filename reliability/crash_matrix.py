"""The crash matrix, the long run (issue 6, item 1): a node SIGKILLed hundreds of times under SMTP load.

    .venv/bin/python reliability/crash_matrix.py [--kills 200] [--backend sqlite] [--backend postgresql]
                                                 [--seed N] [--clients 3]

For each backend (both by default) runs tests/reliability/crash_matrix.py ``run_crash_matrix`` on a fresh
store (SQLite in a temporary directory; PostgreSQL: a new database on POWEREMAIL_TEST_DATABASE_URL,
default postgresql://postgres@127.0.0.1:5432/test, dropped afterwards): one node (api, smtp, delivery)
relaying to a loopback receiver, client threads sending continuously, ``--kills`` SIGKILLs at random and
aimed moments (mid-DATA, after a 250, mid-delivery, at the remote 250), a restart after each; then the
queue drains and the invariants are checked.

Prints per backend: kills (by moment), messages attempted / answered 250 / stored / stored without a 250,
recipients by state, arrivals, lost, partial, usage mismatch, duplicates and whether each was in flight
at a kill. Exits 1 if any invariant broke.

Bounded: about 2.5 s per kill per backend (a random 0.3-2 s between kills, aiming, a restart), plus a drain
of at most 120 s.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.* helpers

from tests.reliability.crash_matrix import run_crash_matrix
from tests.support import create_postgres_database, drop_postgres_database, run


def run_backend(backend: str, args: argparse.Namespace, seed: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix=f"crash-matrix-{backend}-") as name:
        directory = Path(name)
        database_url = (
            f"sqlite:///{directory / 'poweremail.sqlite3'}"
            if backend == "sqlite"
            else run(create_postgres_database())
        )
        try:
            figures = run_crash_matrix(
                database_url, directory, args.kills, seed, clients=args.clients, progress=True
            )
        except AssertionError as exc:  # the node did not come back, or the queue did not drain
            print(f"{backend}: run failed: {exc}", flush=True)
            return [f"{backend}: run failed"]
        finally:
            if backend == "postgresql":
                run(drop_postgres_database(database_url))
    print(figures.summary(), flush=True)
    if figures.duplicates:
        print("  duplicates (address: arrivals, in flight at a kill):", flush=True)
        shown = sorted(figures.duplicates.items())
        for address, (count, in_flight) in shown[:60]:
            print(f"    {address}: {count}, {'in flight' if in_flight else 'NOT IN FLIGHT'}", flush=True)
        if len(shown) > 60:
            print(f"    ... and {len(shown) - 60} more", flush=True)
    return [f"{backend}: {problem}" for problem in figures.problems()]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--clients", type=int, default=3, help="SMTP client threads sending continuously")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    problems: list[str] = []
    for backend in args.backend or ["sqlite", "postgresql"]:
        start = time.monotonic()
        print(f"{backend}: {args.kills} kills, seed {seed}", flush=True)
        problems += run_backend(backend, args, seed)
        print(f"{backend}: {time.monotonic() - start:.0f}s", flush=True)
    for problem in problems:
        print(f"VIOLATION {problem}")
    print("crash matrix: " + ("FAILED" if problems else "all invariants held"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
