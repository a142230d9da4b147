"""Every benchmark of issue 5 in one go, and one table of all their targets.

    python bench/run.py [--postgresql URL] [--quick] [--only smtp,workers,split,delivery,api,scale]

Needs the bench extra (``pip install -e '.[bench]'``: py-spy for the profile, httpx), ``wrk`` for the
API benchmark (``apt-get install wrk``) and Postfix's ``smtp-sink`` (installed on first use as root).

Runs, one after the other (never two at once: each needs the machine to itself):

- ``bench/smtp.py --deliver``: SMTP acceptance against a bare aiosmtpd, while PowerEmail delivers
  what it accepts to a local smtp-sink (target 1), SQLite and PostgreSQL -> docs/benchmarks/smtp.md
- ``bench/smtp.py --deliver --workers 2``: the same with two worker processes (target 2)
  -> docs/benchmarks/smtp-workers-2.md
- ``bench/smtp.py --deliver --delivery-workers 1``: the same with delivery in a process of its own
  beside one SMTP worker (``serve --delivery-workers 1``) -> docs/benchmarks/smtp-delivery-workers-1.md
- ``bench/delivery.py --delivery 50:10 --delivery 50:10:separate``: the queue drains as fast as it
  fills (target 3), delivery in the SMTP process and in one of its own -> docs/benchmarks/delivery.md
- ``bench/api.py``: listSmtp against a bare endpoint, p99 at 64 connections (target 4)
  -> docs/benchmarks/api.md
- ``bench/scale.py``: costs with 1,000,000 SMTP users, memory of idle sessions, a 25 MiB upload
  beside small ones (target 5) -> docs/benchmarks/scale.md

Each writes its report and a JSON summary beside it; this script then prints one table (target,
ours, baseline, ratio, goal, met) from those summaries, and writes it to docs/benchmarks/README.md.
``--quick`` passes each benchmark fewer, shorter runs (a smoke test of the whole, not figures to
quote); ``--table-only`` runs nothing and makes the table from the summaries already written. Exits
1 if any benchmark failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from _machine import cpu_model

BENCH_DIR = Path(__file__).resolve().parent
REPORTS = BENCH_DIR.parent / "docs" / "benchmarks"
DEFAULT_POSTGRESQL = "postgresql://postgres@127.0.0.1:5432/test"
QUICK = ["--runs", "1", "--duration", "3"]
# Delivery in the SMTP process (the default) and in one of its own (serve --delivery-workers 1).
DELIVERY_SETTINGS = ["--delivery", "50:10", "--delivery", "50:10:separate"]


def steps(args: argparse.Namespace) -> dict[str, tuple[list[str], Path]]:
    stores = ["--database-url", "sqlite", "--database-url", args.postgresql]
    quick = QUICK if args.quick else []
    return {
        "smtp": (
            ["smtp.py", "--deliver", "--profile", "--quiet-wait", "60", *stores, *quick],
            REPORTS / "smtp.md",
        ),
        "workers": (
            [
                "smtp.py",
                "--deliver",
                "--workers",
                "2",
                "--quiet-wait",
                "60",
                *stores,
                *quick,
                "--report",
                str(REPORTS / "smtp-workers-2.md"),
            ],
            REPORTS / "smtp-workers-2.md",
        ),
        "split": (
            [
                "smtp.py",
                "--deliver",
                "--delivery-workers",
                "1",
                "--quiet-wait",
                "60",
                *stores,
                *quick,
                "--report",
                str(REPORTS / "smtp-delivery-workers-1.md"),
            ],
            REPORTS / "smtp-delivery-workers-1.md",
        ),
        "delivery": (
            ["delivery.py", *DELIVERY_SETTINGS, "--quiet-wait", "60", *stores, *quick],
            REPORTS / "delivery.md",
        ),
        "api": (["api.py", *quick], REPORTS / "api.md"),
        "scale": (
            ["scale.py", "--database-url", args.postgresql, *(["--quick"] if args.quick else [])],
            REPORTS / "scale.md",
        ),
    }


def summary_table(names: list[str], reports: dict[str, Path]) -> str:
    lines = [
        "| benchmark | target | ours | baseline | ratio | goal | met |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name in names:
        summary = reports[name].with_suffix(".json")
        if not summary.exists():
            lines.append(f"| {name} | (no summary: the benchmark did not finish) | | | | | |")
            continue
        for row in json.loads(summary.read_text()):
            met = (
                "-"
                if row["goal"] == "reported"
                else {True: "yes", False: "**no**", None: "-"}[row.get("met")]
            )
            lines.append(
                f"| [{name}]({reports[name].name}) | {row['target']} | {_number(row['ours'])} |"
                f" {_number(row['baseline'])} | {_ratio(row.get('ratio'))} | {row['goal']} | {met} |"
            )
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, int | float) else str(value)


def _ratio(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, int | float) else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgresql", default=DEFAULT_POSTGRESQL, help=f"server URL (default {DEFAULT_POSTGRESQL})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs: a smoke test")
    parser.add_argument("--only", help="comma-separated: smtp,workers,split,delivery,api,scale (default all)")
    parser.add_argument(
        "--table-only", action="store_true", help="run nothing: the table from the summaries already written"
    )
    args = parser.parse_args()
    plan = steps(args)
    names = args.only.split(",") if args.only else list(plan)
    unknown = [name for name in names if name not in plan]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(plan)}")
    failed = []
    for name in [] if args.table_only else names:
        command, _ = plan[name]
        print(f"\n=== {name}: python bench/{' '.join(command)}", flush=True)
        done = subprocess.run([sys.executable, str(BENCH_DIR / command[0]), *command[1:]], check=False)
        if done.returncode != 0:
            failed.append(f"{name} (exit {done.returncode})")
    table = summary_table(names, {name: report for name, (_, report) in plan.items()})
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f"# Benchmarks: every target of issue 5\n\nMade by `python bench/run.py`"
        f"{' --quick (smoke test: not figures to quote)' if args.quick else ''} on {when};"
        f" `nproc` = {len(os.sched_getaffinity(0))}, {cpu_model()}. Each line links its report, which has"
        f" the method, every run and the profile.\n\n{table}\n"
    )
    if failed:
        page += "\nFailed: " + ", ".join(failed) + "\n"
    (REPORTS / "README.md").write_text(page)
    print(f"\n{table}\n")
    for failure in failed:
        print(f"FAILED: {failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
