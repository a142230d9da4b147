"""Many SMTP connections held open from one thread of the test process: idle ones, and ones that
trickle one byte a second (slowloris), each from a chosen loopback source address.

Linux routes all of 127.0.0.0/8 to the loopback interface, so 127.x.y.z are distinct client
addresses to the server: its per-address limits see them as different clients.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

# At most this many connections are being opened at once (the listen backlog is 1,024).
OPENING_AT_ONCE = 100


def addresses(prefix: str, count: int) -> list[str]:
    """``count`` loopback addresses under ``prefix`` ("127.1" → 127.1.0.1, 127.1.0.2, ...)."""
    return [f"{prefix}.{n // 250}.{n % 250 + 1}" for n in range(count)]


@dataclass
class _Connection:
    source: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    trickle: Iterator[int] | None = None  # the bytes it sends, one a second; None: idle
    idle_since: float = 0.0  # its last complete command (the server's idle timer restarts there)
    closed_at: float | None = None  # when the server closed it


@dataclass
class LoadReport:
    opened: int = 0
    open_seconds: float = 0.0
    trickle_rounds: int = 0  # seconds in which every trickling connection sent its byte
    closed_by_server: int = 0
    longest_idle: float = 0.0  # from the last complete command to the server closing it
    errors: list[str] = field(default_factory=list)


_Opener = Callable[[str], Awaitable[_Connection]]


class Load:
    """Holds the connections in an event loop of its own, in a thread, until :meth:`stop`."""

    def __init__(
        self,
        port: int,
        *,
        idle_sources: Iterable[str],
        command_trickle_sources: Iterable[str],
        data_trickle_sources: Iterable[str],
        login: tuple[str, str],
    ) -> None:
        self._port = port
        self._idle = list(idle_sources)
        self._command_trickle = list(command_trickle_sources)
        self._data_trickle = list(data_trickle_sources)
        self._login = login
        self.report = LoadReport()
        self._connections: list[_Connection] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.started_at = 0.0  # monotonic time every connection was open and trickling began
        self._thread = threading.Thread(target=self._run, name="smtp-load", daemon=True)

    # --- from the test's thread ---

    def start(self, timeout: float = 60) -> LoadReport:
        """Opens every connection (each greeted with 220) and starts trickling."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the load did not open within {timeout}s")
        if self.report.errors:
            raise AssertionError(f"{len(self.report.errors)} connection(s) failed: {self.report.errors[:5]}")
        self.started_at = time.monotonic()
        return self.report

    def wait_closed_by_server(self, timeout: float) -> LoadReport:
        """Keeps every connection as it is until the server has closed them all (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.report.closed_by_server < len(self._connections):
            time.sleep(0.2)
        return self.report

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    # --- in the load's thread ---

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            started = time.monotonic()
            gate = asyncio.Semaphore(OPENING_AT_ONCE)
            plans = [
                *((source, self._open_idle) for source in self._idle),
                *((source, self._open_command_trickle) for source in self._command_trickle),
                *((source, self._open_data_trickle) for source in self._data_trickle),
            ]
            opened = await asyncio.gather(*(self._guarded(gate, opener, source) for source, opener in plans))
            self._connections = [c for c in opened if c is not None]
            self.report.opened = len(self._connections)
            self.report.open_seconds = time.monotonic() - started
        finally:
            self._ready.set()
        watchers = [asyncio.create_task(self._watch(c)) for c in self._connections]
        trickler = asyncio.create_task(self._trickle())
        await self._stop.wait()
        trickler.cancel()
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(trickler, *watchers, return_exceptions=True)
        for connection in self._connections:
            connection.writer.close()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                await connection.writer.wait_closed()

    async def _guarded(self, gate: asyncio.Semaphore, opener: _Opener, source: str) -> _Connection | None:
        async with gate:
            try:
                return await asyncio.wait_for(opener(source), 20)
            except (OSError, TimeoutError, AssertionError) as exc:
                self.report.errors.append(f"{source}: {type(exc).__name__} {exc}")
                return None

    async def _connect(self, source: str) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", self._port, local_addr=(source, 0))
        connection = _Connection(source, reader, writer)
        try:
            greeting = await reader.readline()
            assert greeting.startswith(b"220"), greeting
        except BaseException:
            writer.close()
            raise
        connection.idle_since = time.monotonic()
        return connection

    async def _open_idle(self, source: str) -> _Connection:
        return await self._connect(source)

    async def _open_command_trickle(self, source: str) -> _Connection:
        """Before login, a command line that never ends (within the test)."""
        connection = await self._connect(source)
        connection.trickle = itertools.cycle(b"EHLO slow-" + b"s" * 900)
        return connection

    async def _open_data_trickle(self, source: str) -> _Connection:
        """Logged in, in a transaction, sending the message one byte a second."""
        connection = await self._connect(source)
        name, password = self._login
        token = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
        for command, expected in (
            ("EHLO slow.example", b"250 "),
            (f"AUTH PLAIN {token}", b"235 "),
            ("MAIL FROM:<slow@sender.test>", b"250 "),
            ("RCPT TO:<slow@example.test>", b"250 "),
            ("DATA", b"354 "),
        ):
            connection.writer.write(command.encode() + b"\r\n")
            reply = await _reply(connection.reader)
            if not reply.startswith(expected):
                connection.writer.close()
                raise AssertionError(f"{command.split()[0]}: {reply!r}")
        connection.idle_since = time.monotonic()
        connection.trickle = itertools.cycle(b"Subject: slow\r\n\r\nOne byte a second.\r\n")
        return connection

    async def _trickle(self) -> None:
        tricklers = [c for c in self._connections if c.trickle is not None]
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            sent = 0
            for connection in tricklers:
                if connection.closed_at is None and connection.trickle is not None:
                    connection.writer.write(bytes([next(connection.trickle)]))
                    sent += 1
            if sent == len(tricklers):
                self.report.trickle_rounds += 1
            next_round += 1.0
            await asyncio.sleep(max(0.0, next_round - loop.time()))

    async def _watch(self, connection: _Connection) -> None:
        """Reads (and drops) what the server says until it closes the connection."""
        try:
            while await connection.reader.read(4096):
                pass
        except OSError:
            pass
        connection.closed_at = time.monotonic()
        self.report.closed_by_server += 1
        self.report.longest_idle = max(self.report.longest_idle, connection.closed_at - connection.idle_since)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of a (possibly multi-line) reply."""
    while True:
        line = await reader.readline()
        if len(line) < 4 or line[3:4] != b"-":
            return line
