"""``poweremail serve --workers 2`` (issue 5): two processes share the node's ports, on SQLite and on
PostgreSQL. Limits stay exact across them, both really serve, SIGTERM stops both gracefully, a worker
that is killed is started again, and one that keeps dying stops the node with one line. With
``--delivery-workers``, delivery runs in processes of its own and starts at once all the same."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from poweremail.smtp import replies
from tests.delivery.helpers import FAST_DELIVERY
from tests.delivery.receiver import Receiver
from tests.smtp.helpers import add_smtp_user, usage
from tests.smtp.letters import Letter, Outcome, connect, transact
from tests.smtp.raw import RawSMTP
from tests.support import ServerProcess, clean_env, create_owner, poweremail

WORKERS = 2
HOURLY_LIMIT = 60
SESSIONS = 24  # concurrent, each sending LETTERS_PER_SESSION one-recipient letters on new connections
LETTERS_PER_SESSION = 4  # 96 letters for a limit of 60


def _node(database_url: str, tmp_path: Path, *args: str, roles: str = "api,smtp") -> ServerProcess:
    return ServerProcess(
        data_dir=tmp_path / "data",
        database_url=database_url,
        log_path=tmp_path / "serve.log",
        roles=roles,
        extra_args=("--workers", str(WORKERS), "--node-name", "multi", *FAST_DELIVERY, *args),
    )


@pytest.fixture
def node(database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    node = _node(database_url, tmp_path).start()
    try:
        _wait_until_running(node, {1: 1, 2: 1})
        yield node
    finally:
        _stop(node)


def _stop(node: ServerProcess) -> None:
    if node.process is not None and node.process.poll() is None:
        node.stop()


def _running_lines(node: ServerProcess) -> Counter[int]:
    """How many times each worker logged that it runs (a worker started again logs it again)."""
    found = re.findall(r"\[worker (\d+)\]: PowerEmail node running", node.log())
    return Counter(int(index) for index in found)


def _wait_until_running(node: ServerProcess, wanted: dict[int, int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _running_lines(node)
        if all(lines[index] >= count for index, count in wanted.items()):
            return
        time.sleep(0.05)
    raise AssertionError(f"workers not running as {wanted} within {timeout}s:\n{node.log()}")


def _worker_pids(node: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the supervisor's log lines."""
    return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", node.log())}


def _children(parent: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.add(int(entry.name))
    return pids


def _connection_owners(pids: set[int], port: int) -> Counter[int]:
    """How many established connections to local ``port`` each process holds (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 01: ESTABLISHED
                inodes.add(fields[9])
    owners: Counter[int] = Counter()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners[pid] += 1
    return owners


def test_limits_stay_exact_and_both_workers_serve(node: ServerProcess) -> None:
    owner = create_owner(node.database_url)
    user = add_smtp_user(node, owner, total_limit=1_000_000, hourly_limit=HOURLY_LIMIT)
    assert node.process is not None
    workers = _children(node.process.pid)
    assert len(workers) == WORKERS
    # Every session logs in, then all wait while the test looks at who accepted their connections.
    hold = threading.Barrier(SESSIONS + 1, timeout=30)

    def session(index: int) -> list[Outcome]:
        outcomes = []
        for letter in range(LETTERS_PER_SESSION):
            with connect(node.smtp_port, user) as client:
                if letter == 0:
                    hold.wait()
                    hold.wait()
                outcomes.append(transact(client, Letter.to(1)))
        return outcomes

    with ThreadPoolExecutor(SESSIONS) as pool:
        futures = [pool.submit(session, index) for index in range(SESSIONS)]
        try:
            hold.wait()
            owners = _connection_owners(workers, node.smtp_port)
            hold.wait()
        except threading.BrokenBarrierError:
            hold.abort()
        outcomes = [outcome for future in futures for outcome in future.result()]

    # Both workers accepted sessions, and nothing else did (the parent only holds the listening socket).
    assert set(owners) == workers, (owners, workers)
    assert sum(owners.values()) == SESSIONS
    accepted = [o for o in outcomes if o.stage == "DATA" and o.reply.startswith("250 ")]
    refused = [o for o in outcomes if o not in accepted]
    assert len(accepted) == HOURLY_LIMIT
    assert all(o.reply.startswith("451 4.7.1") for o in refused), {o.reply for o in refused}
    assert usage(node, owner, user) == (HOURLY_LIMIT, HOURLY_LIMIT)


def test_sigterm_stops_every_worker_gracefully(node: ServerProcess) -> None:
    user = add_smtp_user(node, create_owner(node.database_url))
    assert node.process is not None
    workers = _children(node.process.pid)
    assert len(workers) == WORKERS
    with RawSMTP(node.smtp_port) as idle:
        assert idle.login(user.name, user.password).startswith("235")
        node.process.send_signal(signal.SIGTERM)
        assert idle.reply() == replies.SHUTTING_DOWN
        assert node.process.wait(timeout=20) == 0
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived the node"
    log = node.log()
    assert "[worker 1]: stopped" in log and "[worker 2]: stopped" in log
    assert "every worker stopped" in log
    with pytest.raises(ConnectionRefusedError):  # the shared listening sockets are closed
        RawSMTP(node.smtp_port, timeout=2)


def test_a_killed_worker_is_started_again_and_mail_still_flows(database_url: str, tmp_path: Path) -> None:
    with Receiver() as relay:
        node = _node(
            database_url, tmp_path, "--relay", relay.address, "--relay-tls", "none", roles="api,smtp,delivery"
        ).start()
        try:
            _wait_until_running(node, {1: 1, 2: 1})
            user = add_smtp_user(node, create_owner(node.database_url))
            assert node.process is not None
            killed = _worker_pids(node)[1]
            assert killed in _children(node.process.pid)
            os.kill(killed, signal.SIGKILL)
            _wait_until_running(node, {1: 2})
            assert f"worker 1 (pid {killed}) was killed by SIGKILL" in node.log()
            restarted = _worker_pids(node)[1]
            assert restarted != killed
            assert _children(node.process.pid) == {restarted, _worker_pids(node)[2]}

            letters = [Letter.to(1) for _ in range(10)]
            for letter in letters:
                with connect(node.smtp_port, user) as client:
                    outcome = transact(client, letter)
                assert outcome.reply.startswith("250 "), outcome
            relay.wait_for_recipients(len(letters))
            assert node.post("listSmtp", create_owner(node.database_url).creds()).status_code == 200
        finally:
            _stop(node)
        assert node.process.returncode == 0


def test_the_api_answers_through_both_workers(node: ServerProcess) -> None:
    owner = create_owner(node.database_url)
    names = {add_smtp_user(node, owner).name for _ in range(6)}
    for _ in range(10):
        response = node.post("listSmtp", owner.creds())
        assert response.status_code == 200, response.text
        assert {entry["smtp_user_name"] for entry in response.json()["smtp_list"]} == names


def test_a_worker_that_keeps_dying_stops_the_node_with_one_line(database_url: str, tmp_path: Path) -> None:
    node = _node(database_url, tmp_path).start()
    try:
        _wait_until_running(node, {1: 1, 2: 1})
        assert node.process is not None
        killed: set[int] = set()
        deadline = time.monotonic() + 30
        while node.process.poll() is None and time.monotonic() < deadline:
            pid = _worker_pids(node).get(1)
            if pid is not None and pid not in killed:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        assert node.process.wait(timeout=20) == 1
    finally:
        _stop(node)
    assert len(killed) == 5
    log = node.log()
    assert log.rstrip().endswith(
        "poweremail: worker 1 keeps dying right after it starts (5 times in a row, last was killed by"
        " SIGKILL); stopping"
    ), log[-2000:]
    assert "[worker 2]: stopped" in log  # the other one was stopped gracefully


def test_delivery_workers_deliver_at_once_and_the_others_do_not_deliver(
    database_url: str, tmp_path: Path
) -> None:
    split = ("--workers", "1", "--delivery-workers", "1")  # the later flag wins over _node's
    # A poll interval longer than the test: only the doorbell can wake the delivery worker in time.
    slow_poll = ("--delivery-poll-interval", "600")
    with Receiver() as relay:
        relaying = ("--relay", relay.address, "--relay-tls", "none")
        node = _node(database_url, tmp_path, *split, *slow_poll, *relaying, roles="api,smtp,delivery").start()
        try:
            _wait_until_running(node, {1: 1, 2: 1})
            log = node.log()
            assert "[worker 1]: PowerEmail node running roles api,smtp on" in log, log
            assert "[worker 2]: PowerEmail node running roles delivery on" in log, log
            assert "[worker 2]: delivery through the relay" in log and "[worker 1]: delivery" not in log
            user = add_smtp_user(node, create_owner(node.database_url))
            for round_ in range(3):  # the bell rings again after it was answered
                with connect(node.smtp_port, user) as client:
                    assert transact(client, Letter.to(2)).reply.startswith("250 ")
                relay.wait_for_recipients(2 * (round_ + 1), timeout=10)
        finally:
            _stop(node)
        assert node.process is not None and node.process.returncode == 0
        assert "[worker 2]: stopped" in node.log()


@pytest.mark.parametrize(
    ("roles", "complaint"),
    [
        ("api,smtp", "--delivery-workers needs the delivery role in --roles"),
        ("delivery", "--delivery-workers leaves --workers nothing to do; use --workers alone"),
    ],
)
def test_delivery_workers_without_work_are_one_line(tmp_path: Path, roles: str, complaint: str) -> None:
    result = poweremail("serve", "--data-dir", str(tmp_path), "--roles", roles, "--delivery-workers", "1")
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"poweremail: bad settings: {complaint}"
    ]


@pytest.mark.parametrize("value", ["-1", "65", "1.0", "one"])
def test_bad_delivery_worker_counts_are_one_line(tmp_path: Path, value: str) -> None:
    result = poweremail(
        "serve", "--data-dir", str(tmp_path), env=clean_env(POWEREMAIL_DELIVERY_WORKERS=value)
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "poweremail: bad value for --delivery-workers (or POWEREMAIL_DELIVERY_WORKERS): "
    ), lines


@pytest.mark.parametrize("value", ["0", "65", "2.0", "two", ""])
def test_bad_worker_counts_are_one_line(tmp_path: Path, value: str) -> None:
    result = poweremail("serve", "--data-dir", str(tmp_path), env=clean_env(POWEREMAIL_WORKERS=value))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("poweremail: bad value for --workers (or POWEREMAIL_WORKERS): "), lines


def test_a_busy_port_is_one_line_with_workers(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = poweremail(
            "serve", "--workers", "2", "--data-dir", str(tmp_path), "--roles", "api", "--api-port", str(port)
        )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"poweremail: cannot listen for the API on 127.0.0.1:{port}"), lines


def test_workers_stop_when_the_parent_is_killed(node: ServerProcess) -> None:
    assert node.process is not None
    workers = _children(node.process.pid)
    assert len(workers) == WORKERS
    node.kill()  # SIGKILL: the supervisor cannot pass anything on
    deadline = time.monotonic() + 20
    while [pid for pid in workers if Path(f"/proc/{pid}").exists()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "orphaned workers kept running"
