"""A node's doorbell: "mail was queued", from its SMTP workers to its delivery workers.

With ``serve --delivery-workers M`` delivery runs in processes of its own, which would otherwise
only see new mail at their next poll (``--delivery-poll-interval``, a second by default) instead of
at once, as a single process does through ``Services.mail_queued``. The supervisor makes one pipe
before it forks; every worker inherits both ends. An SMTP worker writes a byte whenever its
``mail_queued`` is set (at most once per turn of its event loop); a delivery worker drains the pipe
and sets its own ``mail_queued``. Nothing ever blocks on it: a full pipe already says "look".

Every delivery worker's event loop watches the same pipe, so a ring wakes at least one of them (the
first to read drains it); the others find the mail at their next poll, or when it is their turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

_READ_SIZE = 4096


class Doorbell:
    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def ring(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: rung already, not yet answered
            os.write(self._write_fd, b"\0")

    async def forward(self, mail_queued: asyncio.Event) -> None:
        """In an SMTP worker, for as long as it runs: ring whenever ``mail_queued`` is set."""
        while True:
            await mail_queued.wait()
            mail_queued.clear()
            self.ring()

    def listen(self, mail_queued: asyncio.Event) -> Callable[[], object]:
        """In a delivery worker: set ``mail_queued`` when the bell rings. Returns what stops it."""
        loop = asyncio.get_running_loop()

        def answer() -> None:
            rung = False
            with contextlib.suppress(BlockingIOError):  # drained (maybe by another delivery worker)
                while chunk := os.read(self._read_fd, _READ_SIZE):
                    rung = True
                    if len(chunk) < _READ_SIZE:
                        break
                else:  # every write end closed: nobody can ring any more
                    loop.remove_reader(self._read_fd)
            if rung:
                mail_queued.set()

        loop.add_reader(self._read_fd, answer)
        return lambda: loop.remove_reader(self._read_fd)

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
