"""The store going away under a running node, from outside it: PostgreSQL restarting, SQLite's disk
full or failing. ``PostgresRestart`` and ``SqliteDiskFull`` both have ``begin()`` and ``end()``.

PostgreSQL: the node reaches the server through a ``TcpProxy`` of the test's own; ``begin()`` cuts
every connection and refuses new ones, ``end()`` accepts again (see ``tests.reliability.proxy``). The
real server, which other tests share, is never touched.

SQLite: the node's soft limit on file size (RLIMIT_FSIZE), set on the running process with prlimit(2).
At 0, every write(2) the node makes to a regular file fails with EFBIG (Python ignores SIGXFSZ, which
would otherwise kill it), wherever in the file it writes; reads, and the WAL index SQLite keeps in
shared memory, still work. SQLite meets exactly what a full disk (ENOSPC) or a disk gone read-only
(EROFS) gives it: a write that fails, in the middle of a transaction (a cache spill) or at its
commit; it answers SQLITE_IOERR ("disk I/O error") where ENOSPC gives SQLITE_FULL, and both take the
same path (the statement fails and SQLite may roll the whole transaction back). Raising the limit
again is the disk having room again.

Why not something else: a small filesystem (tmpfs with size=, a loop device) needs mount, which an
unprivileged container (CI) may not allow; chmod does not stop root; chattr +i does stop even writes
through open files, but needs root (CAP_LINUX_IMMUTABLE) and a filesystem that keeps the flag (ext4
does; not every container filesystem does); SQLite's max_page_count is a setting of each connection,
inside the node. prlimit needs neither root nor a particular filesystem, only a node running as the
test's user (Linux, prlimit(2)). A really full tmpfs was tried too, outside the suite, with the same
answers and "database or disk is full" in the log; one difference: a small commit that fits in space
the WAL file already has still succeeds there (and is stored, so its 250 is right), where here every
write fails.

The limit covers every file the node writes, including its log: so the node here logs into a pipe
that a thread of the test copies into the log file.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading

from sqlalchemy import make_url

from tests.reliability.proxy import TcpProxy
from tests.support import ServerProcess, clean_env


def refuse_writes(pid: int) -> None:
    """Every write of process ``pid`` to a file fails from now on (EFBIG)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))


def allow_writes(pid: int) -> None:
    """Undo ``refuse_writes``: back to no limit (the soft limit may rise up to the hard one)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))


class PipedServerProcess(ServerProcess):
    """``poweremail serve`` whose output goes through a pipe into ``log_path`` (see above)."""

    _copier: threading.Thread | None = None

    def start(self, timeout: float = 30) -> PipedServerProcess:
        self.process = subprocess.Popen(
            self._command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env()
        )
        self._copier = threading.Thread(target=self._copy_output, name="node-log", daemon=True)
        self._copier.start()
        self._wait_until_ready(timeout)
        return self

    def _output_done(self) -> None:
        self._join_copier()

    def _copy_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with self.process.stdout as output, self.log_path.open("ab", buffering=0) as log:
            for chunk in iter(lambda: os.read(output.fileno(), 65536), b""):
                log.write(chunk)

    def kill(self) -> None:
        super().kill()
        self._join_copier()

    def stop(self) -> int:
        code = super().stop()
        self._join_copier()
        return code

    def _join_copier(self) -> None:
        if self._copier is not None:
            self._copier.join(10)


class PostgresRestart:
    """The PostgreSQL database ``database_url`` behind a proxy: give the node ``node_url``."""

    def __init__(self, database_url: str) -> None:
        real = make_url(database_url)
        self.proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432).start()
        self.node_url = real.set(host="127.0.0.1", port=self.proxy.port).render_as_string(hide_password=False)
        self.cut = 0  # connections cut by the outages so far

    def attach(self, node: ServerProcess) -> None:
        pass

    def begin(self) -> None:
        self.cut += self.proxy.down()

    def end(self) -> None:
        self.proxy.up()

    def close(self) -> None:
        self.proxy.close()


class SqliteDiskFull:
    """The SQLite database ``database_url``, whose node's writes fail while the disk is "full"."""

    def __init__(self, database_url: str) -> None:
        self.node_url = database_url
        self._pid: int | None = None

    def attach(self, node: ServerProcess) -> None:
        assert node.process is not None
        self._pid = node.process.pid

    def begin(self) -> None:
        assert self._pid is not None, "attach() the node first"
        refuse_writes(self._pid)

    def end(self) -> None:
        assert self._pid is not None
        allow_writes(self._pid)

    def close(self) -> None:
        pass


StoreFault = PostgresRestart | SqliteDiskFull


def store_fault(database_url: str) -> StoreFault:
    """What going away means for this database's backend."""
    if make_url(database_url).get_backend_name() == "sqlite":
        return SqliteDiskFull(database_url)
    return PostgresRestart(database_url)
