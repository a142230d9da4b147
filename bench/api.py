"""Benchmark of the management API: listSmtp (10 and 1,000 users) and addSmtp against a bare endpoint.

    python bench/api.py [--runs 3] [--duration 8] [--connections 16] [--more-connections 64]

Starts ``poweremail serve --roles api`` (SQLite, in a temporary data directory) and bench/bare_api.py
(the same web stack answering a constant), creates owners and SMTP users through the API, then
loads each target with wrk, alternating with the bare endpoint within every run so that drift of
the machine (another process, thermal state) touches both sides alike. listSmtp for 10 users and the
bare endpoint are measured once more under ``--more-connections`` (64) for their p99. Medians over the
runs go to the terminal, to docs/benchmarks/api.md and, one row per target, to docs/benchmarks/api.json.
The target of the issue: listSmtp for 10 users at no less than 0.6x the bare endpoint's requests per
second; its p99 under 64 concurrent connections reported.

Needs wrk (Debian: ``apt-get install -y wrk``) and httpx (``pip install -e .[test]``). Exits 1 if any
request failed (non-2xx, socket errors, timeouts) or the server logged an error; the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _machine import cpu_model, machine_cpu, own_cpu, process_cpu
from _servers import (  # bench/ is on sys.path: scripts run as python bench/X.py
    accepts,
    child_environment,
    free_port,
    running,
)

from smtp import source_version

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LUA_SCRIPT = BENCH_DIR / "post.lua"
REPORT_PATH = REPO_ROOT / "docs" / "benchmarks" / "api.md"

TARGET_RATIO = 0.6  # the issue: listSmtp(10 users) >= 0.6x the bare endpoint's requests/s
GOAL_TARGET = "listSmtp, 10 users"
BARE = "bare endpoint"
MORE = "{name}, {connections} connections"  # the targets measured again under --more-connections
# The largest limits the API accepts: the owner that addSmtp loads must never be refused for limits.
MAX_LIMIT = 2_147_483_647
# A measurement during which other processes kept this much of a core busy is flagged as noisy.
NOISY_OTHER_CORES = 0.25
WARMUP_S = 2


@dataclass(frozen=True)
class Owner:
    owner_id: str
    token: str

    def credentials(self) -> dict[str, str]:
        return {"owner_id": self.owner_id, "token": self.token}


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    body: str  # JSON sent on every request
    server_pid: int  # whose CPU time the measurement reports
    connections: int = 0  # 0: --connections


@dataclass(frozen=True)
class WrkResult:
    target: str
    run: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int  # wrk counts answers >= 400 here
    socket_errors: int  # connect, read, write errors and timeouts
    server_cores: float  # CPU the server used, in cores (its threads included)
    other_cores: float  # CPU used by anything but the server, wrk and this script: noise
    steal_cores: float  # CPU the hypervisor gave to other machines: noise we cannot stop

    @property
    def failed(self) -> bool:
        return self.non_2xx > 0 or self.socket_errors > 0

    @property
    def noisy(self) -> bool:
        return self.other_cores > NOISY_OTHER_CORES


@dataclass(frozen=True)
class Summary:
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    ratio_to_bare: float
    server_cores: float
    non_2xx: int
    socket_errors: int


# --- processes --------------------------------------------------------------------------------


def poweremail_command(*args: str) -> list[str]:
    # `python -m poweremail` rather than the `poweremail` script on PATH: the same interpreter as the
    # bare endpoint, whichever environment runs the benchmark.
    return [sys.executable, "-m", "poweremail", *args]


def create_owner(data_dir: Path, name: str) -> Owner:
    command = poweremail_command("owner", "create", "--data-dir", str(data_dir), "--name", name)
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment())
    if done.returncode != 0:
        raise RuntimeError(f"poweremail owner create exited with {done.returncode}: {done.stderr.strip()}")
    created = json.loads(done.stdout)
    return Owner(owner_id=created["owner_id"], token=created["token"])


# --- fixtures through the API -----------------------------------------------------------------


async def add_smtp_users(base_url: str, owner: Owner, count: int, concurrency: int = 16) -> None:
    """Create ``count`` SMTP users for ``owner``, ``concurrency`` calls at a time."""
    body = {**owner.credentials(), "total_limit": 1000, "hourly_limit": 100}
    semaphore = asyncio.Semaphore(concurrency)

    async def add_one(client: httpx.AsyncClient) -> None:
        async with semaphore:
            response = await client.post("/settings/addSmtp", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"addSmtp answered {response.status_code}: {response.text}")

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        await asyncio.gather(*(add_one(client) for _ in range(count)))


def check_target(target: Target, expected: dict[str, Any]) -> None:
    """One request before the load: a target that answers wrongly would make its figures meaningless."""
    response = httpx.post(
        target.url, content=target.body, headers={"Content-Type": "application/json"}, timeout=30
    )
    if response.status_code != 200:
        raise RuntimeError(f"{target.name}: HTTP {response.status_code}: {response.text[:300]}")
    answer = response.json()
    wrong = {key: answer.get(key) for key, value in expected.items() if answer.get(key) != value}
    if wrong:
        raise RuntimeError(f"{target.name}: expected {expected}, got {wrong}")


# --- load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: processes on the whole machine, the server, this process with its waited
    children, and the time the hypervisor gave our virtual CPUs to someone else (steal)."""

    machine: float
    server: float
    ours: float
    steal: float

    @classmethod
    def take(cls, server_pid: int) -> CpuSnapshot:
        machine, steal = machine_cpu()
        # wrk is a waited child once it ends, so own_cpu() counts it.
        return cls(machine=machine, server=process_cpu(server_pid), ours=own_cpu(), steal=steal)

    def others_since(self, before: CpuSnapshot) -> float:
        """CPU seconds of processes other than the server and us (wrk included): other programs, and the
        server that is not being measured. Clock ticks make it coarse (10 ms)."""
        spent = (self.machine - before.machine) - (self.server - before.server) - (self.ours - before.ours)
        return max(0.0, spent)


def run_wrk(target: Target, *, run: int, duration: int, connections: int, threads: int) -> WrkResult:
    # A generous --timeout: wrk's 2 s default would count slow listSmtp(1000) answers as errors
    # rather than as the latencies they are.
    connections = target.connections or connections
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "30s", "--latency",
        "-s", str(LUA_SCRIPT), target.url, "--", target.body,
    ]  # fmt: skip
    before, started = CpuSnapshot.take(target.server_pid), time.monotonic()
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    after, elapsed = CpuSnapshot.take(target.server_pid), time.monotonic() - started
    line = next((line for line in output.splitlines() if line.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no BENCH_RESULT line for {target.name}:\n{output}")
    raw = json.loads(line.removeprefix("BENCH_RESULT "))
    return WrkResult(
        target=target.name,
        run=run,
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        requests=raw["requests"],
        non_2xx=raw["non_2xx_3xx"],
        socket_errors=raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        server_cores=(after.server - before.server) / elapsed,
        other_cores=after.others_since(before) / elapsed,
        steal_cores=(after.steal - before.steal) / elapsed,
    )


def progress_line(r: WrkResult) -> str:
    flags = ("  FAILED REQUESTS" if r.failed else "") + ("  (noisy: other processes busy)" if r.noisy else "")
    return (
        f"{r.target:<22} {r.rps:8.1f} req/s  p50 {r.p50_ms:8.2f} ms  p99 {r.p99_ms:8.2f} ms"
        f"  server CPU {r.server_cores:.2f}{flags}"
    )


def measure(
    bares: dict[int, Target],
    targets: list[Target],
    *,
    runs: int,
    duration: int,
    connections: int,
    threads: int,
) -> list[WrkResult]:
    """Each target right after the bare endpoint under as many connections."""
    for target in [*bares.values(), *targets]:  # warm pools, page caches, CPU frequency; not counted
        run_wrk(target, run=0, duration=WARMUP_S, connections=connections, threads=threads)
    results: list[WrkResult] = []
    for run in range(1, runs + 1):
        for target in targets:
            for measured in (bares[target.connections], target):
                result = run_wrk(
                    measured, run=run, duration=duration, connections=connections, threads=threads
                )
                print(f"  run {run}/{runs}  {progress_line(result)}", flush=True)
                results.append(result)
    return results


def summarize(results: list[WrkResult], order: list[str], bare_of: dict[str, str]) -> list[Summary]:
    """Medians over the runs; the ratio is of the median requests/s to the median of the bare endpoint
    under as many connections (``bare_of``: target name -> its bare endpoint's name)."""
    by_target = {name: [r for r in results if r.target == name] for name in order}
    summaries = []
    for name, rows in by_target.items():
        bare_rps = statistics.median(r.rps for r in by_target[bare_of[name]])
        rps = statistics.median(r.rps for r in rows)
        summaries.append(
            Summary(
                target=name,
                rps=rps,
                p50_ms=statistics.median(r.p50_ms for r in rows),
                p99_ms=statistics.median(r.p99_ms for r in rows),
                ratio_to_bare=rps / bare_rps,
                server_cores=statistics.median(r.server_cores for r in rows),
                non_2xx=sum(r.non_2xx for r in rows),
                socket_errors=sum(r.socket_errors for r in rows),
            )
        )
    return summaries


def server_errors(log_path: Path) -> list[str]:
    """Lines where the server logged an error or a traceback: any of them spoils the figures."""
    return [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if " ERROR " in line or "Traceback" in line
    ]


# --- report -----------------------------------------------------------------------------------


def versions() -> str:
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()
    packages = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("fastapi", "starlette", "uvicorn", "sqlalchemy")
    )
    return f"{packages}; {wrk[0].split(' [')[0] if wrk else 'wrk'}"


def table(summaries: list[Summary]) -> str:
    lines = [
        "| target | requests/s | p50 (ms) | p99 (ms) | vs bare (requests/s) | server CPU (cores)"
        " | failed requests |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        failed = s.non_2xx + s.socket_errors
        failures = f"**{failed}** ({s.non_2xx} non-2xx, {s.socket_errors} socket)" if failed else "0"
        figures = (
            f"{s.rps:,.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} | {s.ratio_to_bare:.2f}x | {s.server_cores:.2f}"
        )
        lines.append(f"| {s.target} | {figures} | {failures} |")
    return "\n".join(lines)


def runs_table(results: list[WrkResult]) -> str:
    lines = [
        "| run | target | requests/s | p50 (ms) | p99 (ms) | server CPU | other CPU | steal |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        other = f"**{r.other_cores:.2f}**" if r.noisy else f"{r.other_cores:.2f}"
        cpu = f"{r.server_cores:.2f} | {other} | {r.steal_cores:.2f}"
        figures = f"{r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {cpu}"
        lines.append(f"| {r.run} | {r.target} | {figures} |")
    return "\n".join(lines)


def noise_note(results: list[WrkResult]) -> str:
    noisy = [r for r in results if r.noisy]
    if not noisy:
        return f"No measurement saw other processes use more than {NOISY_OTHER_CORES} of a core."
    return (
        f"**{len(noisy)} of {len(results)} measurements saw other processes use more than"
        f" {NOISY_OTHER_CORES} of a core** (bold below): their figures are lower than a quiet machine's."
    )


def verdict(summaries: list[Summary]) -> str:
    goal = next(s for s in summaries if s.target == GOAL_TARGET)
    met = "**met**" if goal.ratio_to_bare >= TARGET_RATIO else "**not met**"
    text = (
        f"Target (listSmtp for 10 users at >= {TARGET_RATIO}x the bare endpoint's requests/s): {met}, "
        f"at {goal.ratio_to_bare:.2f}x ({goal.rps:,.0f} vs {goal.rps / goal.ratio_to_bare:,.0f} requests/s)."
    )
    more = [s for s in summaries if s.target.startswith(GOAL_TARGET + ",")]
    for s in more:
        text += (
            f" Under {s.target.rsplit(', ', 1)[1]}: p99 {s.p99_ms:.2f} ms (p50 {s.p50_ms:.2f} ms),"
            f" {s.ratio_to_bare:.2f}x the bare endpoint's requests/s."
        )
    return text


def json_rows(summaries: list[Summary], bare_of: dict[str, str]) -> list[dict[str, Any]]:
    """One row per target for a combined runner: requests/s against the bare endpoint's, and p99."""
    by_name = {s.target: s for s in summaries}
    rows: list[dict[str, Any]] = []
    for s in summaries:
        if s.target in bare_of.values():
            continue
        bare = by_name[bare_of[s.target]]
        goal = s.target == GOAL_TARGET
        rows.append(
            {
                "target": f"API: {s.target} vs bare endpoint",
                "ours": round(s.rps, 1),
                "baseline": round(bare.rps, 1),
                "ratio": round(s.ratio_to_bare, 3),
                "unit": "requests/s",
                "goal": f">= {TARGET_RATIO}x" if goal else "reported",
                "met": s.ratio_to_bare >= TARGET_RATIO if goal else True,
            }
        )
        if s.target.startswith(GOAL_TARGET + ","):
            rows.append(
                {
                    "target": f"API: {s.target}, p99 vs bare endpoint's",
                    "ours": round(s.p99_ms, 2),
                    "baseline": round(bare.p99_ms, 2),
                    "ratio": round(s.p99_ms / bare.p99_ms, 3) if bare.p99_ms else None,
                    "unit": "ms",
                    "goal": "reported",
                    "met": True,
                }
            )
    return rows


def render_report(
    args: argparse.Namespace, summaries: list[Summary], results: list[WrkResult], problems: list[str]
) -> str:
    problems_text = (
        "\n".join(f"- {p}" for p in problems) if problems else "None: every request answered 2xx/3xx."
    )
    return f"""# API benchmark

Made by `python bench/api.py` (see its docstring); rerun it to refresh this file.

- Date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- Machine: `nproc` = {len(os.sched_getaffinity(0))}, {cpu_model()}
- Python: {platform.python_version()} ({platform.python_implementation()}), {versions()}
- Commit: {source_version()}
- Parameters: {args.runs} runs x {args.duration} s per target, {args.connections} connections (and \
{args.more_connections} where the target says so), {args.threads} wrk thread(s), {WARMUP_S} s warm-up \
per target first (not counted)
- Servers: `poweremail serve --roles api` with the default SQLite store in a temporary directory
  (WAL, synchronous=FULL), and `bench/bare_api.py`, the same uvicorn settings (httptools, standard
  asyncio loop, no access log, lifespan off) with one route that parses the JSON body and answers a
  constant. Both are one process on one event loop; wrk runs on the same machine.
- Bodies: listSmtp and the bare endpoint get `{{"owner_id", "token"}}`; addSmtp also gets the
  largest limits, and creates one SMTP user per request for an owner of its own (its user count
  grows during the benchmark; the listSmtp owners keep exactly 10 and 1,000 users).

Medians over the runs; "vs bare" is the median requests/s over the bare endpoint's median.

{table(summaries)}

{verdict(summaries)}

## Failures

{problems_text}

## Every measurement

Within each run the targets alternate with the bare endpoint, in this order. The CPU columns are in
cores (CPU seconds per second): "server CPU" is the server under load, its threads included; "other
CPU" is what other processes used meanwhile (not the server, wrk or this script); "steal" is the time
the hypervisor gave this machine's virtual CPUs to others. {noise_note(results)}

{runs_table(results)}
"""


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=3, help="runs; each measures every target once (default 3)"
    )
    parser.add_argument("--duration", type=int, default=8, help="seconds of load per measurement (default 8)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument(
        "--more-connections",
        type=int,
        default=64,
        help="listSmtp (10 users) and the bare endpoint again under this many, for p99 (default 64)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="wrk threads (default 1: the other core serves)"
    )
    parser.add_argument(
        "--report", type=Path, default=REPORT_PATH, help=f"markdown output (default {REPORT_PATH})"
    )
    args = parser.parse_args()
    if min(args.runs, args.duration, args.connections, args.threads) < 1:
        parser.error("--runs, --duration, --connections and --threads must be at least 1")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # SystemExit unwinds through the same finally clauses as Ctrl-C, so a `kill` or a CI timeout
    # also stops the servers and removes the temporary directory.
    raise SystemExit(128 + signum)


def prepare_targets(
    api: Server, bare_server: Server, owners: dict[str, Owner], more_connections: int
) -> tuple[dict[int, Target], list[Target]]:
    """Create the SMTP users, and check that every target answers as expected before any load."""
    print("creating 10 + 1,000 SMTP users through the API ...", flush=True)
    asyncio.run(add_smtp_users(api.url, owners["ten"], 10))
    asyncio.run(add_smtp_users(api.url, owners["thousand"], 1000))
    ten, thousand = json.dumps(owners["ten"].credentials()), json.dumps(owners["thousand"].credentials())
    adding = {**owners["writer"].credentials(), "total_limit": MAX_LIMIT, "hourly_limit": MAX_LIMIT}
    # The bare endpoint gets the listSmtp body, so both sides read and parse the same bytes.
    bare = Target(BARE, f"{bare_server.url}/bare", ten, bare_server.pid)
    more = {"name": GOAL_TARGET, "connections": more_connections}
    bares = {
        0: bare,
        more_connections: Target(
            MORE.format(name=BARE, connections=more_connections),
            bare.url,
            ten,
            bare_server.pid,
            more_connections,
        ),
    }
    targets = [
        Target(GOAL_TARGET, f"{api.url}/settings/listSmtp", ten, api.pid),
        Target("listSmtp, 1,000 users", f"{api.url}/settings/listSmtp", thousand, api.pid),
        Target("addSmtp", f"{api.url}/settings/addSmtp", json.dumps(adding), api.pid),
        Target(MORE.format(**more), f"{api.url}/settings/listSmtp", ten, api.pid, more_connections),
    ]
    expected_messages = ["10 SMTP users", "1000 SMTP users", "SMTP User Created", "10 SMTP users"]
    check_target(bare, {"status": "success"})
    for target, message in zip(targets, expected_messages, strict=True):
        check_target(target, {"status": "success", "message": message})
    return bares, targets


def find_problems(results: list[WrkResult], logs: dict[str, Path]) -> list[str]:
    problems = [
        f"{r.target}, run {r.run}: {r.non_2xx} non-2xx answers, {r.socket_errors} socket errors or timeouts"
        for r in results
        if r.failed
    ]
    for server, log_path in logs.items():
        problems += [f"{server} logged: {line}" for line in server_errors(log_path)[:20]]
    return problems


def benchmark(
    args: argparse.Namespace, work: Path
) -> tuple[dict[int, Target], list[Target], list[WrkResult], list[str]]:
    """Start both servers in ``work``, measure, stop them; return the targets, results and problems."""
    data_dir = work / "data"
    owners = {name: create_owner(data_dir, name) for name in ("ten", "thousand", "writer")}
    api_port, bare_port = free_port(), free_port()
    logs = {"poweremail": work / "poweremail.log", "bare endpoint": work / "bare.log"}
    serve = poweremail_command(
        "serve", "--data-dir", str(data_dir), "--api-port", str(api_port), "--roles", "api"
    )
    bare_server = [sys.executable, str(BENCH_DIR / "bare_api.py"), "--port", str(bare_port)]
    # Both servers stop in the finally clauses of `running`, on success, error or Ctrl-C alike.
    with (
        running(serve, logs["poweremail"], lambda: accepts(api_port)) as api_process,
        running(bare_server, logs["bare endpoint"], lambda: accepts(bare_port)) as bare_process,
    ):
        bares, targets = prepare_targets(
            Server(f"http://127.0.0.1:{api_port}", api_process.pid),
            Server(f"http://127.0.0.1:{bare_port}", bare_process.pid),
            owners,
            args.more_connections,
        )
        print(f"measuring: {args.runs} runs x {args.duration} s, {args.connections} connections", flush=True)
        results = measure(
            bares,
            targets,
            runs=args.runs,
            duration=args.duration,
            connections=args.connections,
            threads=args.threads,
        )
    # Read the logs only now: the servers have stopped and flushed them.
    return bares, targets, results, find_problems(results, logs)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if shutil.which("wrk") is None:
        print("bench/api.py: wrk is not installed; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="poweremail-bench-") as tmp:
        bares, targets, results, problems = benchmark(args, Path(tmp))
    bare_of = {t.name: bares[t.connections].name for t in [*bares.values(), *targets]}
    summaries = summarize(results, [*(b.name for b in bares.values()), *(t.name for t in targets)], bare_of)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(render_report(args, summaries, results, problems))
    rows = json_rows(summaries, bare_of)
    args.report.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{table(summaries)}\n\n{verdict(summaries)}")
    for problem in problems:
        print(f"FAILURE: {problem}")
    if any(r.noisy for r in results):
        print(f"NOTE: {noise_note(results)}".replace("**", ""))
    print(f"\nwritten to {args.report}")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are already stopped and the directory removed by now
        print("bench/api.py: interrupted", file=sys.stderr)
        sys.exit(130)
