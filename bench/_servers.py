"""Starting and stopping the servers a benchmark measures: shared by bench/api.py and bench/smtp.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BARE_SCRIPT = Path(__file__).resolve().parent / "bare_smtp.py"
BARE_USER, BARE_PASSWORD = "bench", "bench-password"  # what bench/bare_smtp.py accepts
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


_handed_out: set[int] = set()


def free_port() -> int:
    # The port is released before the server binds it; another process could take it in between,
    # but on a benchmark machine that is unlikely, and the server would then fail to start, loudly.
    # The kernel may give the same free port to two calls in a row: each is handed out once.
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def child_environment() -> dict[str, str]:
    # Without POWEREMAIL_* variables: a POWEREMAIL_DATABASE_URL left in the shell would otherwise
    # point the benchmark's server at that database.
    return {name: value for name, value in os.environ.items() if not name.startswith("POWEREMAIL_")}


def start_server(command: list[str], log_path: Path, ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
    """Start ``command``, its output to ``log_path``, and return once ``ready()`` says so."""
    with log_path.open("wb") as log:
        # A session of its own (as for every child): Ctrl-C reaches only the benchmark, which then
        # stops the children in order.
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=child_environment(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {process.returncode}:\n{log_path.read_text()}")
            if ready():
                return process
            time.sleep(0.1)
        raise RuntimeError(f"{command[:4]} was not ready within {STARTUP_TIMEOUT_S:.0f} s")
    except BaseException:
        stop_process(process)
        raise


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM (an orderly stop), then SIGKILL if it does not end in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running(
    command: list[str], log_path: Path, ready: Callable[[], bool]
) -> Iterator[subprocess.Popen[bytes]]:
    """The server while the block runs; it stops on success, error and Ctrl-C alike."""
    process = start_server(command, log_path, ready)
    try:
        yield process
    finally:
        stop_process(process)
