"""``poweremail serve --workers N``: N pre-forked processes serving one node, and their supervisor.

One Python process uses about one core (the GIL): a node uses more by running several. The parent
does, once, everything that can fail with one clear line or that N processes must not race to do
(``cli``: bind every port, create the data directory, key and certificate, migrate, give back the
node's old delivery leases), keeps no thread and no event loop, then forks the workers and only
supervises them: SIGTERM or SIGINT is passed on to every worker, each stops gracefully, and the
parent exits 0 once all have; a worker that dies unexpectedly is logged and started again.

Why inherited sockets rather than SO_REUSEPORT (one socket per worker): with SO_REUSEPORT a second,
stale ``poweremail serve`` of the same user binds the same port without an error and silently takes
its share of the connections. One listening socket, bound by the parent and shared by the workers,
keeps "port in use" an error; the kernel hands each connection to whichever worker is waiting in
accept, so new connections go to the idle workers rather than by a hash of the client's address.

Known: what a process keeps in memory stays per worker (the failed-login throttles, the concurrent
sessions per address, the delivery worker's concurrency and connections per destination).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

logger = logging.getLogger("poweremail.supervisor")

# A worker that dies sooner than this after it started counts as dying "right after start";
# after this many such deaths in a row of one worker, the node stops instead of looping.
QUICK_DEATH_SECONDS: Final = 10.0
MAX_QUICK_DEATHS: Final = 5
# The first restart is almost at once (a crash should cost little); each quick death after it
# doubles the wait, up to the last.
RESTART_DELAYS: Final = (0.2, 0.5, 1.0, 2.0, 4.0)
# After SIGTERM, the workers get --shutdown-grace and this much more before they are killed.
STOP_MARGIN_SECONDS: Final = 15.0

# The signals the parent waits for. Workers start with SIGINT and SIGTERM still blocked (pending, not
# lost); run_node unblocks them once its event loop handles them.
STOP_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM})
_PARENT_SIGNALS: Final = STOP_SIGNALS | {signal.SIGCHLD}
_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


class SupervisorError(Exception):
    """The workers cannot be kept running; one line saying why."""


@dataclass
class _Worker:
    index: int  # 1..N: the name in the logs and in the delivery leases
    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0  # in a row
    restart_at: float | None = None  # when dead and waiting to be started again


def worker_label(index: int) -> str:
    return f"worker {index}"


def supervise(
    *, workers: int, run_worker: Callable[[int], int], on_stop: Callable[[], None], shutdown_grace: float
) -> int:
    """Fork ``workers`` processes, each running ``run_worker(index)`` (its return is its exit status),
    and keep them running until SIGTERM or SIGINT; returns 0 once every worker stopped cleanly.

    ``on_stop`` runs in the parent when it starts stopping (close its copies of the listening
    sockets, so they close once every worker has closed its own). Raises ``SupervisorError``.
    """
    # Forking a process with threads copies locks other threads may hold; the parent has none left.
    others = [thread.name for thread in threading.enumerate() if thread is not threading.current_thread()]
    if others:
        raise SupervisorError(f"cannot start workers: threads still running ({', '.join(others)})")
    # Blocked before the first fork, waited for with sigtimedwait: no signal is lost between a fork
    # and the wait, and no handler runs in the middle of the bookkeeping.
    signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
    slots = [_Worker(index) for index in range(1, workers + 1)]
    stop_deadline = shutdown_grace + STOP_MARGIN_SECONDS
    try:
        try:
            for slot in slots:
                _start(slot, run_worker)
            failure = _run_until_stopped(slots, run_worker)
        except BaseException:
            on_stop()
            _stop_all(slots, deadline=time.monotonic() + stop_deadline)
            raise
        on_stop()
        clean = _stop_all(slots, deadline=time.monotonic() + stop_deadline)
    finally:
        # A second Ctrl-C or SIGTERM that came while stopping is answered already: drop it rather
        # than let it end the parent with another status once unblocked.
        while signal.sigtimedwait(_PARENT_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)
    if failure is not None:
        raise SupervisorError(failure)
    if not clean:
        raise SupervisorError("not every worker stopped cleanly (see the log above)")
    logger.info("every worker stopped")
    return 0


def _start(slot: _Worker, run_worker: Callable[[int], int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()  # or the child would write the parent's buffered lines again
    try:
        pid = os.fork()
    except OSError as exc:
        raise SupervisorError(f"cannot start {worker_label(slot.index)}: {exc.strerror}") from None
    if pid == 0:
        _worker_main(slot.index, run_worker)
    slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), None
    logger.info("%s started (pid %d)", worker_label(slot.index), pid)


def _worker_main(index: int, run_worker: Callable[[int], int]) -> NoReturn:
    """The forked child: never returns into the parent's stack."""
    status = 1
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        _stop_with_parent()
        status = run_worker(index)
    except BaseException:
        logger.exception("%s failed", worker_label(index))
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)  # not exit(): the parent's finally clauses and atexit hooks are not ours


def _stop_with_parent() -> None:
    """If the parent dies without stopping us (SIGKILL), get SIGTERM: stop gracefully, do not linger
    on the ports as orphans. Linux only; elsewhere orphans run until stopped."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _run_until_stopped(slots: list[_Worker], run_worker: Callable[[int], int]) -> str | None:
    """Supervise until SIGTERM/SIGINT (returns None) or a worker keeps dying (returns why)."""
    while True:
        now = time.monotonic()
        waiting = [slot.restart_at for slot in slots if slot.restart_at is not None]
        timeout = max(0.0, min(waiting) - now) if waiting else 60.0
        received = signal.sigtimedwait(_PARENT_SIGNALS, timeout)
        if received is not None and received.si_signo in STOP_SIGNALS:
            logger.info("%s: stopping every worker", signal.Signals(received.si_signo).name)
            return None
        for slot, status in _reap(slots):
            dead, slot.pid = slot.pid, 0
            lived = time.monotonic() - slot.started
            slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH_SECONDS else 0
            how = _describe_exit(status)
            if slot.quick_deaths >= MAX_QUICK_DEATHS:
                return (
                    f"{worker_label(slot.index)} keeps dying right after it starts ({slot.quick_deaths}"
                    f" times in a row, last {how}); stopping"
                )
            delay = RESTART_DELAYS[min(max(slot.quick_deaths - 1, 0), len(RESTART_DELAYS) - 1)]
            logger.error(
                "%s (pid %d) %s after %.1f s; starting it again in %.1f s",
                worker_label(slot.index), dead, how, lived, delay,
            )  # fmt: skip
            slot.restart_at = time.monotonic() + delay
        for slot in slots:
            if slot.restart_at is not None and slot.restart_at <= time.monotonic():
                _start(slot, run_worker)


def _reap(slots: list[_Worker]) -> list[tuple[_Worker, int]]:
    """The workers that ended since the last look, with their wait statuses."""
    ended = []
    by_pid = {slot.pid: slot for slot in slots if slot.pid}
    while by_pid:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if (slot := by_pid.pop(pid, None)) is not None:
            ended.append((slot, status))
    return ended


def _stop_all(slots: list[_Worker], *, deadline: float) -> bool:
    """SIGTERM to every live worker, wait for all (killing what outlives ``deadline``); True when every
    one exited 0."""
    for slot in slots:
        slot.restart_at = None
        if slot.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)
    clean = True
    while any(slot.pid for slot in slots):
        for slot, status in _reap(slots):
            if os.waitstatus_to_exitcode(status) != 0:
                logger.error("%s (pid %d) %s while stopping", worker_label(slot.index), slot.pid,
                             _describe_exit(status))  # fmt: skip
                clean = False
            slot.pid = 0
        if not any(slot.pid for slot in slots):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            for slot in slots:
                if slot.pid:
                    logger.error("%s (pid %d) did not stop in time; killing it", worker_label(slot.index),
                                 slot.pid)  # fmt: skip
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_MARGIN_SECONDS
            clean = False
            continue
        # Another SIGTERM/SIGINT meanwhile changes nothing: the workers already have theirs.
        signal.sigtimedwait(_PARENT_SIGNALS, min(left, 1.0))
    return clean


def _describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
