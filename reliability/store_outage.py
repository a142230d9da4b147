"""The store goes away, the long run (issue 6, item 3): several outages in a row under steady load.

    .venv/bin/python reliability/store_outage.py [--backend sqlite] [--backend postgresql]
                                                 [--outages 5] [--seconds 3] [--between 5] [--senders 4]

For each backend (both by default), starts ``poweremail serve`` with every role on free loopback ports
and a fresh store (SQLite in a temporary directory; PostgreSQL: a new database on
POWEREMAIL_TEST_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/test, dropped afterwards),
delivering through a recording relay on loopback. Under steady load (``--senders`` SMTP sessions
sending letters of 1-3 recipients back to back, the first sender's 3 MB each; a new login every 0.2 s;
an API client alternating listSmtp and editSmtp) the store goes away ``--outages`` times for
``--seconds`` each, ``--between`` seconds apart:

- PostgreSQL restarts: a TCP proxy between the node and the server cuts every connection and refuses
  new ones, then accepts again (the real server, shared with others, is not touched);
- SQLite's disk is full: every write of the node's process fails (its file-size limit is set to 0 from
  outside with prlimit), then works again.

Prints, per outage: the replies seen while the store was away (SMTP by stage and reply, API by call and
status), the 250s after DATA among them (must be 0), and the seconds from the store's return until the
first 250, every sender's 250, an API read, an API write and a new login succeeded, and failures after
that (relapses). Then, per backend: messages answered 250 against messages stored (lost, stored twice,
stored without a 250), usage against stored recipients, and the delivery worker's backlog drained.
Exits 1 if a 250 came for what was not stored, a message was lost or stored twice, usage differs from
what is stored, anything did not recover before the next outage, or mail was not all delivered once.

Bounded: about 2 + outages x (seconds + between) seconds of load per backend, plus start and drain.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.* helpers

from tests.delivery.receiver import Receiver
from tests.reliability.outage import (
    delivery_figures,
    ledger_figures,
    outage_figures,
    run_outages,
    start_outage_node,
)
from tests.reliability.outage_load import LARGE_BODY, SteadyLoad
from tests.reliability.store_faults import store_fault
from tests.smtp.helpers import add_smtp_user
from tests.support import create_owner, create_postgres_database, drop_postgres_database, run

LIMIT = 1_000_000
DRAIN_BOUND = 60.0  # seconds the delivery worker gets, after the load, to deliver what is left


def run_backend(backend: str, args: argparse.Namespace, directory: Path) -> list[str]:
    """One backend's run; returns what went wrong (empty: all held)."""
    database_url = (
        f"sqlite:///{directory / 'poweremail.sqlite3'}"
        if backend == "sqlite"
        else run(create_postgres_database())
    )
    problems: list[str] = []
    fault = store_fault(database_url)
    try:
        with Receiver() as relay:
            node = start_outage_node(directory, fault, relay)
            try:
                fault.attach(node)
                owner = create_owner(database_url)
                user = add_smtp_user(node, owner, total_limit=LIMIT, hourly_limit=LIMIT)
                load = SteadyLoad(
                    node, owner, user, senders=args.senders, total_limit=LIMIT, first_sender_body=LARGE_BODY
                )
                windows, stopped = run_outages(
                    load, fault, outages=args.outages, seconds=args.seconds, between=args.between, warmup=2
                )
                horizons = [window.starting for window in windows[1:]] + [stopped]
                for number, (window, horizon) in enumerate(zip(windows, horizons, strict=True), start=1):
                    figures = outage_figures(load, window, horizon)
                    print(f"{backend} outage {number}: {figures.summary()}", flush=True)
                    if figures.acknowledged_during:
                        problems.append(f"outage {number}: {len(figures.acknowledged_during)} 250s")
                    if figures.recovered is None:
                        problems.append(f"outage {number}: not recovered within {args.between} s")
                    if figures.relapses:
                        problems.append(f"outage {number}: relapses {figures.relapses[:3]}")
                delivery = delivery_figures(load, database_url, relay, since=stopped, bound=DRAIN_BOUND)
                ledger = ledger_figures(load, database_url)
            finally:
                node.stop()
        print(f"{backend}: {ledger.summary()}", flush=True)
        print(f"{backend}: {delivery.summary()}", flush=True)
        log = node.log()
        print(
            f"{backend}: node log {len(log.splitlines())} lines, {log.count('Traceback')} tracebacks;"
            f" {getattr(fault, 'cut', 0)} store connections cut",
            flush=True,
        )
        if ledger.lost or ledger.stored_twice:
            problems.append(f"lost {ledger.lost}, stored twice {ledger.stored_twice}")
        if ledger.sent_total != ledger.stored_recipients:
            problems.append(f"usage {ledger.sent_total} != stored recipients {ledger.stored_recipients}")
        if delivery.drained is None or delivery.relayed_twice or delivery.relayed != delivery.recipients:
            problems.append(f"delivery: {delivery.summary()}")
    finally:
        fault.close()
        if backend == "postgresql":
            run(drop_postgres_database(database_url))
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--outages", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each outage lasts")
    parser.add_argument("--between", type=float, default=5.0, help="seconds of load after each outage")
    parser.add_argument("--senders", type=int, default=4)
    args = parser.parse_args()
    problems: dict[str, list[str]] = {}
    for backend in args.backend or ["sqlite", "postgresql"]:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"store-outage-{backend}-") as directory:
            problems[backend] = run_backend(backend, args, Path(directory))
        print(f"{backend}: {time.monotonic() - started:.0f} s in all", flush=True)
    failed = {backend: found for backend, found in problems.items() if found}
    for backend, found in failed.items():
        print(f"{backend}: FAILED: {'; '.join(found)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
