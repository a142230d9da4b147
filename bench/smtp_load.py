"""The load generator of bench/smtp.py: N authenticated SMTP sessions on plain asyncio streams.

    python bench/smtp_load.py --port 2525 --user U --password P --mode reused --size 1024 \
        --sessions 20 --duration 8 [--wait-for-go]

A client of its own rather than smtplib or aiosmtplib: the client shares the machine with the
server it measures, so every microsecond it spends is one the server might have had. It writes each
command, reads the reply (no pipelining: one round trip per command, as most submission clients
do), and prints one JSON line (``RESULT {...}``) with what it counted.

Modes: ``reused`` logs every session in once, before the clock starts, then sends messages back to
back on it; ``new`` opens a connection, reads the greeting, sends EHLO and AUTH PLAIN, sends one
message and QUIT, for every message. Each message has one recipient and ``--size`` bytes.

A message counts as sent only when the reply to its final dot is 2xx. Every other reply (at MAIL,
RCPT, DATA, the dot, the greeting, EHLO or AUTH), a refused or dropped connection and a timeout
count as errors, by step and reply (in ``new`` mode a failed QUIT too); after an error the session
starts over on a new connection, because a non-2xx reply may have left the server's session in any
state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from base64 import b64encode
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# Long enough for a 100 KB message behind a busy SQLite write lock; short enough that a wedged
# server ends the measurement instead of hanging the benchmark.
REPLY_TIMEOUT_S = 60.0
LINE_LENGTH = 76  # body line length, as MIME encoders write them
# After a failed connection attempt: a pause, so that a server that refuses everything is not
# hammered into a busy loop that would distort its CPU figures.
RETRY_PAUSE_S = 0.05


class ReplyError(Exception):
    """A reply other than the one expected, or no reply: an error to count, then a new session.

    Its text, "STEP: reply", is the key errors are counted under.
    """

    def __init__(self, step: str, reply: str) -> None:
        super().__init__(f"{step}: {reply}")


@dataclass
class Tally:
    """What one process's sessions counted; shared by its sessions (one event loop, no locks)."""

    sent: int = 0  # 2xx replies to the final dot, those after the deadline included
    errors: Counter[str] = field(default_factory=Counter)  # "STEP: reply" -> count
    latencies: list[float] = field(default_factory=list)  # seconds per sent message
    last_reply_at: float = 0.0  # time.time() of the last 2xx to a dot
    start_at: float = 0.0  # time.time() the clock started
    per_second: Counter[int] = field(default_factory=Counter)  # messages sent in each second


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    user: str
    password: str
    mode: str
    message: bytes  # the DATA payload, ending with CRLF.CRLF


def build_message(size: int) -> bytes:
    """A plain-text message of exactly ``size`` bytes (headers included, end-of-data excluded).

    Lines of 76 letters: no line starts with a dot, so no dot-stuffing is needed, and the bytes
    the server receives are the bytes it stores (plus its own headers).
    """
    headers = (
        b"From: Bench Sender <sender@bench.example>\r\n"
        b"To: Bench Recipient <recipient@bench.example>\r\n"
        b"Subject: PowerEmail SMTP benchmark\r\n"
        b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
    )
    line = b"x" * LINE_LENGTH + b"\r\n"
    remaining = size - len(headers)
    if remaining < len(line):
        raise ValueError(f"--size must be at least {len(headers) + len(line)} bytes")
    full_lines, rest = divmod(remaining, len(line))
    body = line * full_lines
    if rest == 1:
        # No line of one byte: the last full line takes it (77 letters, far under 998).
        body = body[: -len(line)] + b"x" * (LINE_LENGTH + 1) + b"\r\n"
    elif rest:
        body += b"y" * (rest - 2) + b"\r\n"
    message = headers + body
    assert len(message) == size, (len(message), size)
    return message + b".\r\n"


class Connection:
    """One SMTP connection: write a command, read its (possibly multi-line) reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, config: Config) -> Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(config.host, config.port), REPLY_TIMEOUT_S
            )
        except (OSError, TimeoutError) as error:
            raise ReplyError("connect", type(error).__name__) from None
        connection = cls(reader, writer)
        await connection.expect("greeting", b"", b"2")
        return connection

    async def reply(self, step: str) -> bytes:
        """The reply's last line (which holds the code); a multi-line reply's other lines go."""
        try:
            # asyncio.timeout rather than wait_for: no extra task per reply, so a cheaper client.
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                while True:
                    line = await self._reader.readline()
                    if not line.endswith(b"\n"):
                        raise ReplyError(step, "connection closed")
                    if line[3:4] != b"-":
                        return line
        except (OSError, TimeoutError) as error:
            raise ReplyError(step, type(error).__name__) from None

    async def expect(self, step: str, command: bytes, code: bytes) -> None:
        """Send ``command`` (if any) and raise ReplyError unless the reply starts with ``code``."""
        if command:
            self._writer.write(command)
        line = await self.reply(step)
        if not line.startswith(code):
            raise ReplyError(step, line.decode("ascii", "replace").strip())

    async def login(self, config: Config) -> None:
        await self.expect("EHLO", b"EHLO bench.example\r\n", b"2")
        blob = b64encode(b"\x00" + config.user.encode() + b"\x00" + config.password.encode())
        await self.expect("AUTH", b"AUTH PLAIN " + blob + b"\r\n", b"2")

    async def send_message(self, config: Config) -> None:
        await self.expect("MAIL", b"MAIL FROM:<sender@bench.example>\r\n", b"2")
        await self.expect("RCPT", b"RCPT TO:<recipient@bench.example>\r\n", b"2")
        await self.expect("DATA", b"DATA\r\n", b"3")
        await self.expect("dot", config.message, b"2")

    async def quit(self) -> None:
        # QUIT and its 221 are part of a real client's cost per connection, so they are measured.
        await self.expect("QUIT", b"QUIT\r\n", b"2")
        self.close()

    def close(self) -> None:
        self._writer.close()


async def open_logged_in(config: Config, tally: Tally) -> Connection | None:
    try:
        connection = await Connection.open(config)
    except ReplyError as error:
        tally.errors[str(error)] += 1
        await asyncio.sleep(RETRY_PAUSE_S)
        return None
    try:
        await connection.login(config)
    except ReplyError as error:
        tally.errors[str(error)] += 1
        connection.close()
        return None
    return connection


def count_sent(tally: Tally, started: float) -> None:
    now = time.time()
    tally.sent += 1
    tally.latencies.append(now - started)
    tally.last_reply_at = now
    tally.per_second[int(now - tally.start_at)] += 1


async def reused_session(
    config: Config, tally: Tally, connection: Connection | None, deadline: float
) -> None:
    """Messages back to back on ``connection`` (logged in before the clock started)."""
    while time.time() < deadline:
        if connection is None:
            connection = await open_logged_in(config, tally)
            continue
        started = time.time()
        try:
            await connection.send_message(config)
        except ReplyError as error:
            tally.errors[str(error)] += 1
            connection.close()
            connection = None
            continue
        count_sent(tally, started)
    if connection is not None:
        try:
            await connection.quit()
        except ReplyError:
            connection.close()  # the measurement is over; a lost QUIT reply is not an error


async def new_connection_session(config: Config, tally: Tally, deadline: float) -> None:
    """Connect, EHLO, AUTH, one message, QUIT; again. The latency counts from the connect."""
    while time.time() < deadline:
        started = time.time()
        connection = await open_logged_in(config, tally)
        if connection is None:
            continue
        try:
            await connection.send_message(config)
        except ReplyError as error:
            tally.errors[str(error)] += 1
            connection.close()
            continue
        count_sent(tally, started)
        try:
            await connection.quit()
        except ReplyError as error:
            tally.errors[str(error)] += 1


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_for_go() -> float:
    """Tell bench/smtp.py this process is ready; return the start time it answers with.

    Blocking on stdin stops the event loop, which is fine: nothing is under way, and the logged-in
    sessions only wait for their next command.
    """
    print("READY", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 2 or line[0] != "GO":
        raise SystemExit(f"smtp_load.py: expected 'GO <time>' on stdin, got {line!r}")
    return float(line[1])


async def generate(
    config: Config, *, sessions: int, duration: float, start: Callable[[], float]
) -> dict[str, object]:
    tally = Tally()
    connections: list[Connection | None] = [None] * sessions
    if config.mode == "reused":
        # Logins happen before the clock starts: this mode measures messages, not logins.
        connections = list(await asyncio.gather(*(open_logged_in(config, tally) for _ in range(sessions))))
    tally.start_at = start()
    await asyncio.sleep(max(0.0, tally.start_at - time.time()))
    cpu_before = cpu_seconds()
    deadline = tally.start_at + duration
    if config.mode == "reused":
        await asyncio.gather(*(reused_session(config, tally, c, deadline) for c in connections))
    else:
        await asyncio.gather(*(new_connection_session(config, tally, deadline) for _ in range(sessions)))
    latencies = sorted(tally.latencies)
    # From the common start to the last 2xx: sessions stop starting messages at the deadline and
    # finish the one under way, so this is the duration plus at most one message's latency.
    elapsed = (tally.last_reply_at if tally.sent else time.time()) - tally.start_at
    return {
        "sent": tally.sent,
        "errors": dict(tally.errors),
        "elapsed": elapsed,
        "cpu_seconds": cpu_seconds() - cpu_before,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
        "per_second": [tally.per_second[i] for i in range(int(elapsed) + 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--mode", choices=["reused", "new"], required=True)
    parser.add_argument("--size", type=int, required=True, help="message bytes, headers included")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--duration", type=float, required=True, help="seconds of load")
    parser.add_argument(
        "--wait-for-go",
        action="store_true",
        help="print READY once logged in, then start at the time read from stdin as 'GO <time.time()>'",
    )
    args = parser.parse_args()
    config = Config(args.host, args.port, args.user, args.password, args.mode, build_message(args.size))
    start = wait_for_go if args.wait_for_go else time.time
    result = asyncio.run(generate(config, sessions=args.sessions, duration=args.duration, start=start))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
