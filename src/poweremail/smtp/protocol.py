"""aiosmtpd's SMTP protocol with PowerEmail's per-connection policy.

Everything here uses aiosmtpd's extension points, as its maintainers intend them to be used:
``connection_made``/``connection_lost`` (per-address connection caps, the session deadline, whether
AUTH is allowed before TLS on this connection), ``_create_session`` (our session fields) and
``push`` (enhanced status codes on two of aiosmtpd's own replies); ``challenge_auth``, ``smtp_MAIL``,
``_getaddr``, ``smtp_DATA`` and ``data_received`` only where aiosmtpd 1.4.6 turns a client's error
into a server error or keeps an endless line in memory. Why not aiosmtpd's own knobs:
``auth_require_tls`` is one value per server, but SPEC §4 exempts loopback clients, which only the
connection knows; and aiosmtpd has no notion of implicit TLS for AUTH.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import logging
import re
from base64 import b64decode, b64encode
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, Session, _Missing, syntax

from poweremail.smtp import replies
from poweremail.smtp.bulk_data import UNMETERED_OCTETS, BulkDataBudget, metered_octets
from poweremail.smtp.message import LineEndings

logger = logging.getLogger("poweremail.smtp")

# The most octets of DATA without a CRLF that a session may send; then it is closed. A line is at most
# 1000 octets (RFC 5321 4.5.3.1.6) and aiosmtpd refuses a longer one when the data ends, but until then
# it keeps every piece of it in memory: a client sending one endless line would take it all.
MAX_DATA_RUN = 1024 * 1024
# The slowest DATA that the idle timeout lets go on (octets a second, averaged over each idle period):
# a phone on a poor link sends kilobytes a second; a connection kept open by a trickle sends less.
MIN_DATA_RATE = 512


class SubmissionSession(Session):
    """aiosmtpd's session, with what the submission server keeps per connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.failed_logins = 0
        self.tls = False
        # Set by the handler at MAIL: the sender's limits and usage, for the early check at RCPT.
        self.sender: Any = None


@dataclass
class ConnectionPolicy:
    """Shared by every connection of one node."""

    max_connections_per_address: int
    session_timeout: float
    plaintext_auth_on_loopback: bool
    open_connections: Counter[str] = field(default_factory=Counter)
    sessions: set[SubmissionSMTP] = field(default_factory=set)  # every accepted connection, live
    draining: bool = False  # the node is stopping: finish open transactions, start none
    bulk_data: BulkDataBudget | None = None  # how fast large messages are read; None: at once


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class SubmissionSMTP(SMTP):
    def __init__(self, handler: Any, *, policy: ConnectionPolicy, implicit_tls: bool, **kwargs: Any) -> None:
        # Set before aiosmtpd's __init__, which inspects every attribute of the instance.
        self._policy = policy
        self._implicit_tls = implicit_tls
        self.client_host = "unknown"
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None  # held: the loop keeps only weak references
        self._in_data = False
        self._since_crlf = 0  # octets received in DATA since the last CRLF
        self._data_octets = 0  # received in DATA since the idle timer last fired
        # For the handler at the end of DATA: the message, and whether it has no lone CR or LF
        # (nothing to normalize).
        self.data_pieces: list[bytes] = []
        self.data_crlf_only = False
        super().__init__(handler, **kwargs)

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ finds the auth_ and smtp_ methods with inspect.getmembers and dir on
        # every new connection, evaluating every attribute; the names are the class's, listed once.
        # Measured: constructing a session 330 -> 84 us; a new connection + AUTH per 1 KB message
        # 2,328 -> 2,424 messages in 8 s (paired runs, medians of 10, ahead in 8).
        return _PROTOCOL_HOOKS

    def _create_session(self) -> SubmissionSession:
        return SubmissionSession(self.loop)

    def submission_session(self) -> SubmissionSession:
        # A method, not a property: aiosmtpd's __init__ evaluates every property of the instance.
        assert isinstance(self.session, SubmissionSession)
        return self.session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # called again after STARTTLS: same connection
            super().connection_made(transport)
            self.submission_session().tls = True
            return
        peer = transport.get_extra_info("peername")
        self.client_host = str(peer[0]) if peer else "unknown"
        counts = self._policy.open_connections
        if counts[self.client_host] >= self._policy.max_connections_per_address:
            # Refused before the greeting (RFC 5321 §3.1 lets a server open with 421).
            self._refused = True
            transport.write(replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        counts[self.client_host] += 1
        self._policy.sessions.add(self)
        if self._implicit_tls or (self._policy.plaintext_auth_on_loopback and is_loopback(self.client_host)):
            self._auth_require_tls = False
        self._deadline = self.loop.call_later(self._policy.session_timeout, self._end_long_session)
        super().connection_made(transport)
        self.submission_session().tls = self._implicit_tls

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._policy.sessions.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
            counts = self._policy.open_connections
            counts[self.client_host] -= 1
            if counts[self.client_host] <= 0:
                del counts[self.client_host]
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if self._in_data and self.transport is not None:
            self._data_octets += len(data)  # see _timeout_cb
            end = data.rfind(b"\r\n")
            self._since_crlf = len(data) - end - 2 if end >= 0 else self._since_crlf + len(data)
            if self._since_crlf > MAX_DATA_RUN:
                logger.info(
                    "closing a session from %s: a line of over %d octets in DATA",
                    self.client_host,
                    MAX_DATA_RUN,
                )
                self._in_data = False
                self.transport.write(replies.DATA_LINE_RUNAWAY.encode() + b"\r\n")  # type: ignore[attr-defined]
                self.transport.close()
                return
        super().data_received(data)

    def _timeout_cb(self) -> None:
        # aiosmtpd restarts the idle timer at each command only, which cut any message taking
        # longer than the idle timeout to arrive (25 MiB at 512 kbit/s takes 7 minutes). During
        # DATA the session goes on for another period if the one that ended brought data at
        # MIN_DATA_RATE or more: a slow link is not idle, a byte a second (slowloris) is.
        received, self._data_octets = self._data_octets, 0
        if self._in_data and received >= MIN_DATA_RATE * self._timeout_duration:
            self._reset_timeout()
            return
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result

    def in_transaction(self) -> bool:
        """Between MAIL and the reply to the end of DATA. aiosmtpd resets the envelope right before it
        writes that reply, in the same step: a session not in a transaction owes its client no reply
        about a message."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def draining(self) -> bool:
        return self._policy.draining

    def close_soon(self, reply: str) -> None:
        if self._closing is None:
            self._closing = self.loop.create_task(self.close_with(reply))

    def _end_long_session(self) -> None:
        self._closing = self.loop.create_task(self.close_with(replies.SESSION_TOO_LONG))

    async def close_with(self, reply: str) -> None:
        if self.transport is None:
            return
        try:
            await self.push(reply)
        except (ConnectionError, RuntimeError):
            pass
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(replies.REWRITES.get(status, status))
        else:
            await super().push(status)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> _Missing | bytes:
        """aiosmtpd's, except for a response longer than a line.

        aiosmtpd reads it with ``StreamReader.readline()``, whose ValueError for a line over the limit
        escaped as a server error (a traceback, ``451 4.3.0``) and left the rest of that line to be
        read as commands. Here the whole line is read and dropped and the answer is RFC 4954 6's
        ``500 5.5.6``. The response is never logged (it is a password).
        """
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(raw) if encode_to_b64 else raw))
        line = await self._read_line()
        if line is None:
            await self.push(replies.AUTH_LINE_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":  # RFC 4954 4: the client cancels
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def _read_line(self) -> bytes | None:
        """The client's next line; None if it is over the line limit, once all of it has been read
        and dropped (as aiosmtpd does with an overlong command)."""
        try:
            return await self._reader.readuntil()
        except asyncio.IncompleteReadError as eof:
            return eof.partial
        except asyncio.LimitOverrunError as overrun:
            consumed = overrun.consumed
        while True:
            await self._reader.read(consumed)
            try:
                await self._reader.readuntil()
                return None
            except asyncio.LimitOverrunError as longer:
                consumed = longer.consumed

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, except that the data is read in blocks rather than line by line.

        Measured: aiosmtpd's loop does Python work for every line (a 25 MiB message is 345,000 of
        them, about a second of the event loop's time, during which every other session waits).
        Here the reader is asked for everything up to the next ".\r\n"; only one that follows a
        CRLF ends the data (RFC 5321 4.1.1.4: CRLF "." CRLF; a bare LF or CR never does, so no
        smuggling). The checks are aiosmtpd's: the size limit, the line length limit (both answered
        once the data has ended, RFC 5321 4.2.5), dot-unstuffing (4.5.2).
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data, self._since_crlf, self._data_octets = True, 0, 0  # see data_received
        try:
            received = await self._receive_data()
        finally:
            self._in_data = False
        if received is None:  # the connection is gone
            return
        if isinstance(received, str):  # too large or a line too long: nothing is kept
            await self.push(received)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # The handler takes the message as the blocks it arrived in (data_pieces), not from the
        # envelope: joining a 25 MiB message held the event loop ~10 ms, and nothing needs it whole.
        self.data_pieces = received.pieces
        self.data_crlf_only = received.crlf_only
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self.data_pieces = []  # not held while the session waits for its next message
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _receive_data(self) -> _Data | str | None:
        """The message (unstuffed), or the reply refusing it, or None if the client left."""
        pieces: list[bytes] = []
        refusal: str | None = None  # once set, the data is read to its end and nothing is kept
        lines, endings = _LineLengths(self.line_length_limit), LineEndings()
        size, limit = 0, self.data_size_limit
        tail = b"\r\n"  # the last two octets read: the DATA command's line ended with CRLF
        while True:
            try:
                piece = await self._reader.readuntil(b".\r\n")
                ends = (tail + piece[-5:-3])[-2:] == b"\r\n"  # the dot starts a line: the end
                if ends:
                    piece = piece[:-3]
            except asyncio.LimitOverrunError as overrun:  # no ".\r\n" within the reader's limit
                piece, ends = await self._reader.readexactly(overrun.consumed), False
            except asyncio.IncompleteReadError:
                return None
            if piece:
                size += len(piece)
                if refusal is None:
                    # Per piece, not over the whole message at its end (a 25 MiB message's replace
                    # held the event loop ~30 ms, every other session waiting).
                    unstuffed = _unstuffed(piece, tail)
                    crlf_only = endings.feed(unstuffed)  # unstuffing moves no CR or LF
                    if not lines.fit(piece, crlf_only=crlf_only):
                        refusal = "500 Line too long (see RFC5321 4.5.3.1.6)"
                    elif limit and size > limit:
                        refusal = "552 Error: Too much mail data"
                    else:
                        pieces.append(unstuffed)
                if refusal is not None:
                    pieces.clear()
                tail = (tail + piece[-2:])[-2:]
                budget = self._policy.bulk_data
                if budget is not None and size > UNMETERED_OCTETS:
                    wait = budget.wait_for(metered_octets(len(piece), size))
                    if wait and not ends:  # (the last piece's debt falls on the next reader)
                        await asyncio.sleep(wait)  # its client waits in TCP flow control
            if ends:
                break
        if refusal is not None:
            return refusal
        return _Data(pieces, endings.crlf_only)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd checks SIZE= with str.isdigit(), which also takes digits that int() refuses ("²"):
        # a ValueError, logged as a server error, and 451 for a syntax error. RFC 1870 3: the value is
        # 1*20DIGIT, ASCII digits. Checked where aiosmtpd would, after HELO and AUTH.
        if arg is not None and any(_is_non_ascii_size(word) for word in arg.split()):
            if not await self.check_helo_needed() and not await self.check_auth_needed("MAIL"):
                await self.push(replies.BAD_SIZE)
            return
        await super().smtp_MAIL(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Measured: aiosmtpd's parser (the email package's RFC 5322 one, and a Protocol class built
        # per call) took 20% of the server's GIL time at MAIL and RCPT. The path nearly every client
        # sends, <dot-atom@domain> followed by nothing or by parameters, is read here; the answer is
        # the same as aiosmtpd's (tests/smtp/test_address_parsing.py compares them), and anything
        # else goes to aiosmtpd's parser.
        simple = _SIMPLE_PATH.fullmatch(arg)
        if simple is not None:
            address, rest = simple.group(1), simple.group(2) or ""
            local_part = address.rpartition("@")[0]
            if self.local_part_limit and len(local_part) > self.local_part_limit:
                return None, None
            return address, rest
        # Python's address parser raises IndexError, not HeaderParseError, when nothing follows the "@"
        # ("MAIL FROM:a@"), AttributeError for an unclosed domain literal ("MAIL FROM:0@["), and
        # UnboundLocalError for "0@[ " (found by hypothesis; aiosmtpd strips the trailing space from
        # a command's argument, so not from the wire today): aiosmtpd let them escape as a server
        # error (451 and a traceback) for what is a malformed address (RFC 5321 4.1.2), which it
        # answers 553 5.1.3. Whatever else that pure parser raises means the same.
        try:
            return super()._getaddr(arg)
        except Exception:
            return None, None


_PROTOCOL_HOOKS = sorted(name for name in dir(SubmissionSMTP) if name.startswith(("auth_", "smtp_")))


# RFC 5321 4.1.2: "<" Dot-string "@" Domain ">", Dot-string being atoms of atext (RFC 5322 3.2.3)
# joined by single dots, and Domain sub-domains of letters, digits and hyphens; then either nothing or
# spaces and mail parameters (which cannot start with a comment, "(", that aiosmtpd would skip).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PARAMETERS = r"[\x21-\x27\x29-\x7e][\x21-\x7e ]*"  # printable ASCII, not starting with "("
_SIMPLE_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_DOMAIN})>(?: +({_PARAMETERS})| *)")


@dataclass(frozen=True)
class _Data:
    pieces: list[bytes]  # the message, unstuffed, in the blocks it was read in
    crlf_only: bool  # no lone CR or LF in it: nothing for normalize_line_endings to do


def _unstuffed(piece: bytes, before: bytes) -> bytes:
    """RFC 5321 4.5.2: a line starting with a dot loses that dot. ``before``: the two octets read
    before ``piece`` (CRLF when ``piece`` starts the data), for a CRLF "." split between pieces."""
    if b"." not in piece:  # found (or not) at memchr's speed: most blocks of a large message
        return piece
    if before == b"\r\n" and piece.startswith(b"."):
        piece = piece[1:]
    elif before.endswith(b"\r") and piece.startswith(b"\n."):
        piece = b"\n" + piece[2:]
    return piece.replace(b"\r\n.", b"\r\n")  # the same bytes object when there is no dot to remove


class _LineLengths:
    """Whether every line of data read piece by piece is within ``limit`` octets, CRLF included
    (aiosmtpd's line_length_limit): per piece, not per line; a CRLF may be split between pieces."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._run = 0  # octets of the line not yet ended, its CR included if it is the last
        self._after_cr = False

    def fit(self, piece: bytes, *, crlf_only: bool = False) -> bool:
        """Whether the lines read so far, ``piece`` included, are within the limit. ``crlf_only``:
        no lone CR or LF has been read, ``piece`` included, so that every LF ends a line."""
        if crlf_only:
            return self._fit_crlf_only(piece)
        if self._after_cr and piece.startswith(b"\n"):  # a CRLF split between two pieces
            fits = self._run + 1 <= self._limit
            self._run, piece = 0, piece[1:]
        else:
            fits = True
        lines = piece.split(b"\r\n")
        if len(lines) == 1:
            self._run += len(piece)
        else:
            longest = max(self._run + len(lines[0]), max(map(len, lines[1:-1]), default=0))
            fits = fits and longest + 2 <= self._limit
            self._run = len(lines[-1])
        self._after_cr = piece.endswith(b"\r")
        # A line not yet ended is too long once it is longer than a line with its CRLF may be.
        return fits and self._run - self._after_cr + 2 <= self._limit

    def _fit_crlf_only(self, piece: bytes) -> bool:
        # From the start of the line being read, the last LF within a line's length ends a line
        # that fits; none there, and the line is too long. One search per ~limit octets, not a list
        # of every line. Measured per 64 KiB of 78-octet lines: 6 µs; splitting it into lines, 67.
        limit, end = self._limit, len(piece)
        start = -self._run  # where the line being read began (in an earlier piece if negative)
        while start + limit < end:
            lf = piece.rfind(b"\n", max(start, 0), start + limit)
            if lf < 0:
                return False
            start = lf + 1
        lf = piece.rfind(b"\n", max(start, 0))
        if lf >= 0:
            start = lf + 1
        self._run, self._after_cr = end - start, piece.endswith(b"\r")
        return self._run - self._after_cr + 2 <= limit


def _is_non_ascii_size(word: str) -> bool:
    return word[:5].upper() == "SIZE=" and not word[5:].isascii()


async def drain_sessions(policy: ConnectionPolicy, *, grace: float) -> int:
    """Stop every session of a node that is shutting down (its listeners already closed).

    Sessions outside a transaction are told 421 and closed at once; a session in a transaction is
    left to finish it (its 250 means stored, its refusal means nothing was) and then closed, for at
    most ``grace`` seconds. Whatever is still open then is closed without a reply: no 250 was sent
    for it, so its client still has the message. Returns how many were cut off that way.
    """
    policy.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while policy.sessions and loop.time() < deadline:
        for session in list(policy.sessions):
            if not session.in_transaction():
                session.close_soon(replies.SHUTTING_DOWN)
        await asyncio.sleep(0.05)
    cut_off = 0
    for session in list(policy.sessions):
        if session.transport is not None:
            session.transport.close()
            cut_off += 1
    return cut_off
