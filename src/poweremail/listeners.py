"""Opening listening sockets before anything starts, so a busy port is one clear error."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any


class ListenError(Exception):
    pass


def bind_tcp(host: str, port: int, *, purpose: str) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``ListenError`` says why not in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen for {purpose} on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen for {purpose} on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TakeTurnsSocket(socket.socket):
    """A listening socket shared by worker processes (``serve --workers``) that accepts at most one
    connection per turn of the event loop.

    Every worker waiting on the shared socket is woken by a new connection. asyncio's accept loop
    would then take every connection waiting (up to 100) in one go: measured with 20 clients
    connecting at once, one worker took all 20 and the other none, and with connections reused for
    hours that is the split for hours. One accept per turn lets the woken workers take turns, and a
    busy worker, slow to come back to its loop, leaves the next connections to the idle ones.
    """

    def __init__(self, listening: socket.socket) -> None:
        super().__init__(fileno=listening.detach())
        self._resting = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._resting:
            # asyncio's accept loop reads this as "nothing waiting" and ends for this turn; the socket
            # is still readable, so the next turn comes back for the rest.
            raise BlockingIOError(errno.EAGAIN, "one connection per turn of the event loop")
        connection = super().accept()
        self._resting = True
        asyncio.get_running_loop().call_soon(self._rest_over)
        return connection

    def _rest_over(self) -> None:
        self._resting = False
