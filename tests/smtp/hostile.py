"""A hostile SMTP client, and a model of what the submission server may answer it (issue 6).

Hypothesis draws *examples*: an SMTP user's limits and a few sessions of commands, valid and mangled
(EHLO/HELO, AUTH PLAIN/LOGIN with right, wrong and garbage credentials, MAIL/RCPT with odd addresses
and parameters, DATA with payloads full of bare CR/LF, dots, NULs and 8-bit bytes, RSET, NOOP, VRFY,
STARTTLS with commands pipelined behind it, QUIT, unknown commands, random bytes, overlong lines).
:func:`run_example` plays one over real sockets against a running ``poweremail serve`` and checks
every reply as it comes against :class:`Session`, a model of the server's state. The model predicts
the exact reply wherever the server is deterministic; where a mangled argument leaves the exact
reply to aiosmtpd's parser, it allows only refusals and follows whatever the server decided, but
never lets through what must not happen:

- a 235 for wrong credentials; MAIL, RCPT or DATA accepted before AUTH (MAIL then gets 530);
- a recipient over the SMTP user's limits or over 100 in a message, or one that is no mailbox;
- a message ended anywhere but at CRLF.CRLF, or accepted over the size or line limit;
- a server error (451 4.3.0 and a traceback), a hang, a closed connection the model did not expect.

Then the store must hold exactly the messages that got a 250, with their sender, recipients and
content (lone CR and LF stored as CRLF), and the user's count must be their recipients; and a fresh,
normal session must still send a message (the server did not crash).

Used by tests/smtp/test_hostile_input.py (CI) and reliability/hostile_smtp.py (long runs).
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
from collections import Counter
from dataclasses import dataclass, field
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import NoReturn

import sqlalchemy as sa
from hypothesis import strategies as st
from sqlalchemy import Connection

from poweremail.smtp import replies
from poweremail.smtp.server import COMMAND_LIMITS
from poweremail.store.schema import messages, recipients, smtp_users
from tests.smtp.helpers import SmtpUser
from tests.support import store_read, stored_bodies

# aiosmtpd 1.4's fixed limits, as a client meets them.
LINE_LIMIT = 1001  # StreamReader limit: a longer line (before its CRLF) is "too long"
COMMAND_SIZE_LIMIT = 512  # a command line, without CRLF; MAIL's grows with extensions (see _mail)
BOGUS_LIMIT = 5  # unknown commands per session; the 5th closes it
KNOWN_VERBS = frozenset(
    {
        "AUTH",
        "DATA",
        "EHLO",
        "EXPN",
        "HELO",
        "HELP",
        "MAIL",
        "NOOP",
        "QUIT",
        "RCPT",
        "RSET",
        "STARTTLS",
        "VRFY",
    }
)


class ModelViolation(AssertionError):
    """The server answered something the model does not allow."""


# --- what a step is -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command line (sent with CRLF; it never contains LF)."""

    line: bytes


@dataclass(frozen=True)
class Auth:
    mechanism: str  # PLAIN or LOGIN
    initial: bool  # the first response on the AUTH line (RFC 4954 initial response)
    name: str  # right, unknown, nul (the right name with a NUL), empty
    password: str  # right, wrong, empty
    corrupt: str | None = None  # the last line is instead: cancel ("*"), garbage (not base64), overlong


@dataclass(frozen=True)
class Data:
    payload: bytes  # never holds a line that is a lone dot: the data ends where the model says
    argument: bytes = b""  # "DATA x" is a syntax error


@dataclass(frozen=True)
class StartTls:
    pipelined: bytes  # sent in the same write as STARTTLS: must never be run


Step = Command | Auth | Data | StartTls


@dataclass(frozen=True)
class SessionPlan:
    implicit_tls: bool
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Example:
    total_limit: int
    hourly_limit: int
    sessions: tuple[SessionPlan, ...]


# --- strategies -----------------------------------------------------------------------------------

_GOOD_ADDRESSES = ["a@example.com", "first.last+tag@example.org", "x_y-z@sub.example.net", "b@[127.0.0.1]"]
_ODD_ADDRESSES = [
    b"<>", b"a", b"<a>", b"<a@b", b"a@b>", b"<a@b>>", b'<"a b"@example.com>', b"<@relay.example:c@d.example>",
    b"<a\rb@example.com>", b"<a\x00b@example.com>", b"<\xff\xfe@example.com>", b"<a@exa\rmple.com>",
    b'<"x\rBcc: y"@example.com>', b"<a\x7f@example.com>", b"<a\x1f@example.com>", b"<@>", b"<a@@b>",
    "<j\u00f6rg@b\u00fccher.example>".encode(), b"<" + b"l" * 250 + b"@example.com>",
    b"<a@" + b"d" * 300 + b".example>", b"<" + b"l" * 241 + b"@example.com>", b"<Postmaster>", b"",
    b" <a@example.com>", b"<a@example.com>SIZE=1", b"<a..b@example.com>", b"<.a@example.com>", b"a@",
    b'""@', b"\x00@",
]  # fmt: skip
_PARAMETERS = [
    b"SIZE=100", b"SIZE=0", b"SIZE=8192", b"SIZE=8193", b"SIZE=99999999999999999999999", b"SIZE=",
    b"SIZE=x", "SIZE=\u00b2".encode(), "SIZE=\uff11\uff12".encode(), b"BODY=8BITMIME", b"BODY=7BIT",
    b"BODY=BINARYMIME", b"BODY=", b"SMTPUTF8", b"SMTPUTF8=yes", b"RET=HDRS", b"ENVID=x", b"XFOO=bar",
    b"NOTIFY=NEVER", b"size=10", b">", b"=",
]  # fmt: skip
_LINE_BYTES = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))


def _address() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(_GOOD_ADDRESSES).map(lambda a: b"<" + a.encode() + b">"),
        st.sampled_from(_ODD_ADDRESSES),
        _LINE_BYTES,
    )


@st.composite
def _mail_or_rcpt(draw: st.DrawFn, verb: bytes) -> Command:
    keyword = b"FROM:" if verb == b"MAIL" else b"TO:"
    keyword = draw(st.sampled_from([keyword, keyword, keyword, keyword.lower(), keyword[:-1], b""]))
    params = draw(st.lists(st.sampled_from(_PARAMETERS) | _LINE_BYTES, max_size=3))
    return Command(b" ".join([verb + b" " + keyword + draw(_address()), *params]))


def _payload() -> st.SearchStrategy[bytes]:
    fragment = st.sampled_from(
        [
            b"Subject: hostile\r\n", b"From: a@example.com\r\n\r\n", b"\r\n", b"\n", b"\r", b".", b"..",
            b"\r\n..\r\n", b"\n.\n", b"\r.\r\n", b"\n.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\r", b"\n.\r",
            b"\r.\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\x00", b"\xff\xfe\x80",
            "caf\u00e9 \u2603".encode(),
            b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n", b"QUIT\r\n",
            b"v" * 998, b"w" * 999, b"x" * 1000, b"y" * 1200, (b"z" * 70 + b"\r\n") * 60,
        ]
    )  # fmt: skip
    return st.lists(fragment | st.binary(max_size=30), max_size=10).map(
        lambda parts: no_early_end(b"".join(parts))
    )


def no_early_end(payload: bytes) -> bytes:
    """``payload`` with a dot added to every line that is a lone dot, so that sent as
    ``payload CRLF . CRLF`` the data ends only at that last dot."""
    wire = payload + b"\r\n"
    while True:
        if wire.startswith(b".\r\n"):
            wire = b"." + wire
            continue
        at = wire.find(b"\r\n.\r\n")
        if at < 0:
            return wire[:-2]
        wire = wire[: at + 2] + b"." + wire[at + 2 :]


def _simple(verb: str, argument: st.SearchStrategy[bytes] | None = None) -> st.SearchStrategy[Command]:
    if argument is None:
        return st.just(Command(verb.encode()))
    return argument.map(lambda arg: Command(verb.encode() + (b" " + arg if arg else b"")))


_INJECTIONS = [
    b"", b"NOOP injected\r\n", b"EHLO injected.example\r\n", b"AUTH PLAIN AHNtdHAxAHB3\r\n",
    b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: injected\r\n\r\n.\r\n",
    b"RSET\r\nQUIT\r\n", b"x" * 600,
]  # fmt: skip


def _step() -> st.SearchStrategy[Step]:
    hostnames = (
        st.sampled_from([b"client.example", b"[127.0.0.1]", b"x", b"", b"\xff\x00 weird"]) | _LINE_BYTES
    )
    unknown = st.sampled_from(
        [b"XYZZY", b"BDAT 10", b"*", b"STARTTLSX", b"MAIL", b" ", b"\x00NOOP", b"\xc3\xa9"]
    )
    return st.one_of(
        hostnames.map(lambda h: Command(b"EHLO " + h if h else b"EHLO")),
        hostnames.map(lambda h: Command(b"HELO " + h if h else b"HELO")),
        st.builds(
            Auth,
            mechanism=st.sampled_from(["PLAIN", "LOGIN"]),
            initial=st.booleans(),
            name=st.sampled_from(["right", "right", "right", "unknown", "nul", "empty"]),
            password=st.sampled_from(["right", "right", "wrong", "empty"]),
            corrupt=st.sampled_from([None, None, None, "cancel", "garbage", "overlong"]),
        ),
        _simple(
            "AUTH", st.sampled_from([b"", b"CRAM-MD5", b"plain", b"PLAIN !!!", b"PLAIN a b", b"LOGIN ="])
        ),
        _mail_or_rcpt(b"MAIL"),
        _mail_or_rcpt(b"RCPT"),
        _mail_or_rcpt(b"RCPT"),
        _mail_or_rcpt(b"RCPT"),
        st.builds(Data, payload=_payload(), argument=st.sampled_from([b"", b"", b"", b"", b"x"])),
        st.builds(Data, payload=_payload()),
        _simple("RSET", st.sampled_from([b"", b"", b"x"])),
        _simple("NOOP", st.sampled_from([b"", b"anything \xff"])),
        _simple("VRFY", st.sampled_from([b"", b"<a@example.com>", b"postmaster", b"\xff"])),
        _simple("HELP", st.sampled_from([b"", b"MAIL", b"\x00"])),
        _simple("EXPN", st.sampled_from([b"list"])),
        _simple("QUIT", st.sampled_from([b"", b"", b"now"])),
        st.builds(StartTls, pipelined=st.sampled_from(_INJECTIONS)),
        unknown.map(Command),
        _LINE_BYTES.map(Command).filter(lambda c: _parse_arguments(c.line)[0] not in ("DATA", "STARTTLS")),
        st.sampled_from([b"NOOP " + b"x" * 600, b"x" * 5000, b"RCPT TO:<" + b"a" * 2000 + b">"]).map(Command),
    )


_PREFIX: list[Step] = [
    Command(b"EHLO client.example"),
    Auth("PLAIN", True, "right", "right"),
    Command(b"MAIL FROM:<a@example.com>"),
    Command(b"RCPT TO:<b@example.com>"),
]


@st.composite
def _session(draw: st.DrawFn) -> SessionPlan:
    steps: list[Step] = draw(st.lists(_step(), max_size=10))
    # Most sessions start right, so that what follows meets a logged-in server in a transaction.
    prefix = _PREFIX[: draw(st.sampled_from([0, 1, 2, 3, 4, 4, 4, 4]))]
    if len(prefix) == len(_PREFIX) and draw(st.booleans()):
        prefix = [*prefix, draw(st.builds(Data, payload=_payload()))]
    return SessionPlan(implicit_tls=draw(st.booleans()), steps=(*prefix, *steps))


def examples() -> st.SearchStrategy[Example]:
    return st.builds(
        Example,
        total_limit=st.sampled_from([1, 2, 5, 1000]),
        hourly_limit=st.sampled_from([1, 3, 1000]),
        sessions=st.lists(_session(), min_size=1, max_size=3).map(tuple),
    )


# --- the wire -------------------------------------------------------------------------------------


class Wire:
    """One client connection; replies are read whole (all lines of a multi-line one)."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None, timeout: float) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self._buffer = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.closed = True  # what it answered before closing is still read

    def reply(self) -> str:
        """The next reply; "" once the server has closed. A server that says nothing times out."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self._buffer:
                try:
                    chunk = self.sock.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    chunk = b""
                if not chunk:
                    self.closed = True
                    return "\n".join(lines)
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def starttls(self, context: ssl.SSLContext) -> bool:
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        except (OSError, ssl.SSLError):
            self.closed = True
            return False
        return True

    def close(self) -> None:
        self.sock.close()


# --- the model ------------------------------------------------------------------------------------


@dataclass
class Sent:
    """A message the server answered 250 for, as the model expects it stored."""

    queue_id: str
    mail_from: str
    recipients: list[str]
    content: bytes


@dataclass
class Account:
    """What one example's SMTP user has sent; shared by its sessions."""

    user: SmtpUser
    total_limit: int
    hourly_limit: int
    sent: list[Sent] = field(default_factory=list)

    def recipients_sent(self) -> int:
        return sum(len(m.recipients) for m in self.sent)


@dataclass
class Stats:
    examples: int = 0
    sessions: int = 0
    commands: int = 0  # lines sent in command mode, AUTH responses included
    data_bytes: int = 0
    accepted: int = 0  # messages
    refused: Counter[str] = field(default_factory=Counter)  # reply code -> count


def _parse_arguments(line: bytes) -> tuple[str | None, str | None]:
    """(verb, argument) as aiosmtpd reads a command line; verb None if it is not ASCII or empty."""
    line = line.rstrip(b"\r\n")
    if not line:
        return None, None
    verb_bytes, _, arg_bytes = line.partition(b" ")
    try:
        verb = verb_bytes.upper().decode("ascii")
    except UnicodeDecodeError:
        return None, None
    if not arg_bytes:
        return verb, None
    return verb, str(arg_bytes.strip(), "utf-8", "surrogateescape")


def aiosmtpd_address(argument: str, keyword: str) -> str | None:
    """The address aiosmtpd takes from a MAIL/RCPT argument (its _getaddr), to follow what it stored."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    rest = argument[len(keyword) :].strip()
    try:
        parsed, _ = get_angle_addr(rest) if rest.lstrip().startswith("<") else get_addr_spec(rest)
    except (HeaderParseError, IndexError):
        return None
    return str(parsed.addr_spec)


def is_mailbox(address: str) -> bool:
    """RFC 5321 4.1.2 / 4.5.3.1.3, written again here: the model must not borrow the server's check."""
    local, _, domain = address.rpartition("@")
    if (
        not local
        or not domain
        or any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) < 0xE000 for c in address)
    ):
        return False
    return len(address.encode()) <= 254


def normalized(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def expected_data_reply(wire_lines: list[bytes], max_size: int) -> tuple[str, bytes]:
    """aiosmtpd's DATA phase over CRLF-terminated lines (the lone dot excluded): the final reply
    and the content (dot-stuffing undone)."""
    state, size, kept = "ok", 0, []
    for line in wire_lines:
        if len(line) - 2 > LINE_LIMIT and state == "ok":
            state = "too long"
        size += len(line)  # RFC 1870 counts no stuffing dots; aiosmtpd does: stricter by one per line
        if state == "ok" and size > max_size:
            state = "too big"
        if state == "ok" and len(line) > LINE_LIMIT:
            state = "too long"
        if state == "ok":
            kept.append(line[1:] if line.startswith(b".") else line)
    if state == "too long":
        return replies.LINE_TOO_LONG, b""
    if state == "too big":
        return replies.MESSAGE_TOO_BIG, b""
    return replies.QUEUED[: replies.QUEUED.index("{")], b"".join(kept)


def crlf_lines(data: bytes) -> list[bytes]:
    parts = data.split(b"\r\n")
    return [p + b"\r\n" for p in parts[:-1]]


@dataclass
class Session:
    """The model of one connection. ``check`` raises ModelViolation; otherwise it follows the reply."""

    account: Account
    max_size: int
    implicit_tls: bool
    stats: Stats
    helo: str | None = None  # "HELO" or "EHLO"
    authenticated: bool = False
    mail_from: str | None = None
    rcpts: list[str] = field(default_factory=list)
    failed_logins: int = 0
    tls: bool = False
    used: Counter[str] = field(default_factory=Counter)
    bogus: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        self.tls = self.implicit_tls

    # -- helpers --

    def _fail(self, what: str, reply: str, allowed: str) -> NoReturn:
        raise ModelViolation(f"{what}: server answered {reply!r}; the model allows {allowed}")

    def _expect(self, what: str, reply: str, *exact: str, prefixes: tuple[str, ...] = ()) -> None:
        if reply in exact or any(reply.startswith(p) for p in prefixes):
            return
        self._fail(what, reply, " or ".join([*map(repr, exact), *(f"{p!r}..." for p in prefixes)]))

    def _close_after(self, what: str, reply: str, expected: str) -> None:
        self._expect(what, reply, expected)
        self.closed = True

    def _reset_transaction(self) -> None:
        self.mail_from = None
        self.rcpts = []

    def _count(self, reply: str) -> None:
        code = reply[:3]
        if code.startswith(("4", "5")):
            self.stats.refused[code] += 1

    # -- command mode: the checks every line goes through, in aiosmtpd's order --

    def precheck(self, line: bytes) -> str | None:
        """The reply the line gets before its command runs, or None if it runs. Updates counters."""
        stripped = line.rstrip(b"\r\n")
        if len(line) + 1 > LINE_LIMIT:  # the reader's limit counts up to the LF, CR included
            return "500 Command line too long"
        verb, _ = _parse_arguments(line)
        if verb is None:
            return "500 Error: bad syntax"
        limit = COMMAND_SIZE_LIMIT
        if len(stripped) > limit and not (verb == "MAIL" and self.helo == "EHLO"):
            return "500 Command line too long"
        budget = COMMAND_LIMITS.get(verb, COMMAND_LIMITS["*"])
        self.used[verb] += 1
        if self.used[verb] > budget:
            self.closed = True
            return f"421 4.7.0 {verb} sent too many times"
        if verb not in KNOWN_VERBS:
            self.bogus += 1
            if self.bogus >= BOGUS_LIMIT:
                self.closed = True
                return "502 5.5.1 Too many unrecognized commands, goodbye."
            return f'500 Error: command "{verb}" not recognized'
        return None

    def check_command(self, line: bytes, reply: str) -> None:
        """A one-line command (not AUTH's exchange, DATA's content or STARTTLS's switch)."""
        self._count(reply)
        verb, arg = _parse_arguments(line)
        stripped = line.rstrip(b"\r\n")
        if verb == "MAIL" and self.helo == "EHLO" and COMMAND_SIZE_LIMIT < len(stripped) <= LINE_LIMIT:
            # MAIL's limit grows by 36 octets with every EHLO the server process has answered (aiosmtpd
            # adds SIZE's and SMTPUTF8's share to a class attribute): either answer may come.
            if reply == "500 Command line too long":
                return
        before = self.precheck(line)
        if before is not None:
            self._expect(f"{stripped[:60]!r}", reply, before)
            return
        assert verb is not None
        what = f"{verb} {stripped[len(verb) + 1 :][:80]!r}"
        if verb in ("EHLO", "HELO"):
            self._hello(verb, arg, reply, what)
        elif verb == "NOOP":
            self._expect(what, reply, "250 OK")
        elif verb == "RSET":
            if arg:
                self._expect(what, reply, "501 Syntax: RSET")
            else:
                self._expect(what, reply, "250 OK")
                self._reset_transaction()
        elif verb == "QUIT":
            if arg:
                self._expect(what, reply, "501 Syntax: QUIT")
            else:
                self._close_after(what, reply, "221 Bye")
        elif verb in ("VRFY", "HELP"):
            if not self.authenticated:
                self._expect(what, reply, replies.AUTH_REQUIRED)
            elif verb == "VRFY" and not arg:
                self._expect(what, reply, "501 Syntax: VRFY <address>")
            else:
                self._expect(what, reply, prefixes=("250 ", "252 ", "501 ", "502 "))
        elif verb == "EXPN":
            self._expect(what, reply, "502 EXPN not implemented")
        elif verb == "MAIL":
            self._mail(arg, reply, what)
        elif verb == "RCPT":
            self._rcpt(arg, reply, what)
        elif verb == "AUTH":  # a mangled AUTH line (the driver cancels a challenge with "*")
            self._auth_line(arg, reply, what)
        else:  # DATA and STARTTLS lines are steps of their own
            raise AssertionError(f"unexpected verb {verb}")

    def _hello(self, verb: str, arg: str | None, reply: str, what: str) -> None:
        if not arg:
            self._expect(what, reply, f"501 Syntax: {verb} hostname")
            return
        self._reset_transaction()
        self.helo = verb
        if verb == "HELO":
            self._expect(what, reply, prefixes=("250 ",))
            return
        self._expect(what, reply, prefixes=("250-",))
        extensions = {line[4:].split(" ")[0] for line in reply.split("\n")}
        if "AUTH" not in extensions or ("STARTTLS" in extensions) == (self.tls or self.implicit_tls):
            self._fail(what, reply, "AUTH always (loopback), STARTTLS only before TLS")

    def _needs_hello_and_auth(self, reply: str, what: str, helo_first: str = "HELO") -> bool:
        """aiosmtpd's first two checks of MAIL, RCPT and DATA; True if one answered."""
        if self.helo is None:
            self._expect(what, reply, f"503 Error: send {helo_first} first")
            return True
        if not self.authenticated:
            self._expect(what, reply, replies.AUTH_REQUIRED)
            return True
        return False

    def _mail(self, arg: str | None, reply: str, what: str) -> None:
        if self._needs_hello_and_auth(reply, what):
            return
        simple = _SIMPLE_MAIL.fullmatch(arg or "")
        if simple and not (self.helo == "HELO" and simple["params"]):
            if self.mail_from is not None:
                self._expect(what, reply, "503 Error: nested MAIL command")
                return
            sizes = re.findall(r"SIZE=(\d+)", arg or "")  # the last one counts
            if sizes and int(sizes[-1]) > self.max_size:
                self._expect(what, reply, replies.MESSAGE_TOO_BIG)
                return
            self._expect(what, reply, replies.SENDER_OK)
        elif reply != replies.SENDER_OK:
            self._expect(what, reply, prefixes=("501 ", "503 ", "552 ", "553 ", "555 "))
            return
        address = aiosmtpd_address(arg or "", "FROM:")
        if self.mail_from is not None or address is None or not (address == "<>" or is_mailbox(address)):
            self._fail(
                what, reply, f"no 250 (in a transaction: {self.mail_from is not None}, address {address!r})"
            )
        self.mail_from = address

    def _rcpt(self, arg: str | None, reply: str, what: str) -> None:
        if self._needs_hello_and_auth(reply, what):
            return
        if self.mail_from is None:
            self._expect(what, reply, "503 Error: need MAIL command")
            return
        sent = self.account.recipients_sent() + len(self.rcpts)
        if _SIMPLE_RCPT.fullmatch(arg or ""):
            if len(self.rcpts) >= replies.MAX_RECIPIENTS:
                self._expect(what, reply, replies.TOO_MANY_RECIPIENTS)
            elif sent + 1 > self.account.total_limit:
                self._expect(what, reply, replies.TOTAL_LIMIT.format(limit=self.account.total_limit))
            elif sent + 1 > self.account.hourly_limit:
                self._expect(
                    what, reply, prefixes=("451 4.7.1 Hourly sending limit", "550 5.7.1 This message")
                )
            else:
                self._expect(what, reply, replies.RECIPIENT_OK)
            if reply != replies.RECIPIENT_OK:
                return
        elif reply != replies.RECIPIENT_OK:
            allowed = ("501 ", "553 ", "555 ", "452 4.5.3", "451 4.7.1", "550 5.7.1")
            self._expect(what, reply, prefixes=allowed)
            return
        address = aiosmtpd_address(arg or "", "TO:")
        fits = sent + 1 <= min(self.account.total_limit, self.account.hourly_limit)
        if (
            address is None
            or not is_mailbox(address)
            or len(self.rcpts) >= replies.MAX_RECIPIENTS
            or not fits
        ):
            self._fail(what, reply, f"no 250 (address {address!r}, {len(self.rcpts)} accepted, {sent} sent)")
        self.rcpts.append(address)

    def _auth_line(self, arg: str | None, reply: str, what: str) -> None:
        if self._auth_refused_before_mechanism(arg, reply, what):
            return
        # A mangled mechanism or initial response: refused, or a challenge the driver cancels.
        self._expect(what, reply, prefixes=("501 ", "504 ", "334 "))

    def _auth_refused_before_mechanism(self, arg: str | None, reply: str, what: str) -> bool:
        if self.helo is None:
            self._expect(what, reply, "503 Error: send EHLO first")
        elif self.helo == "HELO":
            self._expect(what, reply, "500 Error: command 'AUTH' not recognized")
        elif self.authenticated:
            self._expect(what, reply, "503 Already authenticated")
        elif not arg:
            self._expect(what, reply, "501 Not enough value")
        elif len(arg.split()) > 2:
            self._expect(what, reply, "501 Too many values")
        elif arg.split()[0] not in ("PLAIN", "LOGIN"):
            self._expect(what, reply, "504 5.5.4 Unrecognized authentication type")
        else:
            return False
        return True

    def check_verdict(self, reply: str, right: bool, what: str) -> None:
        """The answer to a complete, well-formed AUTH exchange."""
        if reply.startswith("454 4.7.0 Too many failed logins"):
            return  # no verdict given: a login throttle (per address, or per user name)
        if right:
            self._expect(what, reply, replies.AUTH_SUCCESS)
            self.authenticated = True
            self.failed_logins = 0
            return
        self.failed_logins += 1
        if self.failed_logins >= 3:
            self._close_after(what, reply, replies.AUTH_TOO_MANY_IN_SESSION)
        else:
            self._expect(what, reply, replies.AUTH_INVALID)

    def after_starttls(self) -> None:
        """RFC 3207 4.2: the server forgets everything it knew from the client, but for the
        per-session command budgets (aiosmtpd keeps those for the connection)."""
        self.helo, self.authenticated, self.failed_logins, self.tls = None, False, 0, True
        self._reset_transaction()

    def check_data_command(self, step: Data, reply: str) -> bool:
        """The reply to the DATA line; True if the content must follow (354)."""
        self._count(reply)
        line = b"DATA" + (b" " + step.argument if step.argument else b"")
        before = self.precheck(line)
        what = f"{line!r}"
        if before is not None:
            self._expect(what, reply, before)
            return False
        if self._needs_hello_and_auth(reply, what):
            return False
        if not self.rcpts:
            self._expect(what, reply, "503 Error: need RCPT command")
            return False
        if step.argument:
            self._expect(what, reply, "501 Syntax: DATA")
            return False
        self._expect(what, reply, prefixes=("354 ",))
        return True

    def check_end_of_data(self, step: Data, reply: str) -> None:
        self._count(reply)
        expected, content = expected_data_reply(crlf_lines(step.payload + b"\r\n"), self.max_size)
        self._expect(f"end of data ({len(step.payload)} octets)", reply, prefixes=(expected,))
        if reply.startswith("250 "):
            assert self.mail_from is not None
            mail_from = "" if self.mail_from == "<>" else self.mail_from
            queue_id = reply.rsplit(" ", 1)[1]
            self.account.sent.append(Sent(queue_id, mail_from, list(self.rcpts), content))
            self.stats.accepted += 1
        self._reset_transaction()


# MAIL and RCPT arguments whose exact reply the model predicts; the rest it only bounds.
_SIMPLE_ADDRESS = r"<[A-Za-z0-9._+-]{1,64}@(?:[a-z0-9.-]{1,100}|\[127\.0\.0\.1\])>"
_SIMPLE_MAIL = re.compile(
    rf"FROM:(?:{_SIMPLE_ADDRESS}|<>)(?P<params>(?: (?:SIZE=\d{{1,20}}|BODY=(?:7BIT|8BITMIME)|SMTPUTF8))*)"
)
_SIMPLE_RCPT = re.compile(rf"TO:{_SIMPLE_ADDRESS}")


# --- playing an example ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A running server, as the driver reaches it."""

    smtp_port: int
    smtps_port: int
    max_size: int
    tls: ssl.SSLContext  # trusts the server's certificate
    database_url: str


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _auth_lines(step: Auth, user: SmtpUser) -> tuple[list[bytes], bool, bool]:
    """The lines of the exchange, whether the credentials are right (if the exchange completes) and
    whether the first response rides on the AUTH line (not when it is empty: "AUTH LOGIN ")."""
    name = {"right": user.name, "unknown": "smtp0" + user.name[4:], "nul": user.name + "\0", "empty": ""}[
        step.name
    ]
    password = {"right": user.password, "wrong": user.password + "x", "empty": ""}[step.password]
    right = step.name == "right" and step.password == "right"
    verb = f"AUTH {step.mechanism}".encode()
    if step.mechanism == "PLAIN":
        tokens = [_b64(f"\0{name}\0{password}".encode())]
    else:
        tokens = [_b64(name.encode()), _b64(password.encode())]
    if step.corrupt is not None:
        tokens[-1] = {"cancel": b"*", "garbage": b"!not base64!", "overlong": b"QUFB" * 600}[step.corrupt]
    if step.initial and tokens[0]:
        return [verb + b" " + tokens[0], *tokens[1:]], right, True
    return [verb, *tokens], right, False


def _play_auth(wire: Wire, model: Session, step: Auth) -> None:
    lines, right, initial = _auth_lines(step, model.account.user)
    what = f"AUTH {step}"
    first = lines[0]
    wire.send(first + b"\r\n")
    model.stats.commands += 1
    reply = wire.reply()
    model._count(reply)
    before = model.precheck(first)
    if before is not None:
        model._expect(what, reply, before)
        return
    _, arg = _parse_arguments(first)
    if model._auth_refused_before_mechanism(arg, reply, what):
        return
    for index, line in enumerate(lines):
        if index > 0:
            wire.send(line + b"\r\n")
            model.stats.commands += 1
            reply = wire.reply()
            model._count(reply)
        if index < len(lines) - 1:
            model._expect(what, reply, prefixes=("334 ",))
            continue
        on_auth_line = index == 0 and initial
        if step.corrupt == "overlong":  # on the AUTH line it is a command too long (precheck)
            model._expect(what, reply, replies.AUTH_LINE_TOO_LONG)
        elif step.corrupt == "cancel":
            model._expect(
                what, reply, "501 5.5.2 Cannot decode base64" if on_auth_line else "501 5.7.0 Auth aborted"
            )
        elif step.corrupt == "garbage":
            model._expect(what, reply, "501 5.5.2 Cannot decode base64", "501 5.5.2 Can't decode base64")
        elif step.mechanism == "PLAIN" and step.name == "nul":
            model._expect(what, reply, "501 5.5.2 Cannot split the PLAIN credentials")
        else:
            model.check_verdict(reply, right, what)
        return


def _play_command(wire: Wire, model: Session, step: Command) -> None:
    wire.send(step.line + b"\r\n")
    model.stats.commands += 1
    reply = wire.reply()
    model.check_command(step.line, reply)
    if reply.startswith("334 ") and not model.closed:  # a mangled AUTH that opened an exchange
        wire.send(b"*\r\n")
        model.stats.commands += 1
        model._expect("AUTH cancelled", wire.reply(), "501 5.7.0 Auth aborted")


def _play_data(wire: Wire, model: Session, step: Data) -> None:
    wire.send(b"DATA" + (b" " + step.argument if step.argument else b"") + b"\r\n")
    model.stats.commands += 1
    if model.check_data_command(step, wire.reply()):
        wire.send(step.payload + b"\r\n.\r\n")
        model.stats.data_bytes += len(step.payload) + 5
        model.check_end_of_data(step, wire.reply())


def _play_starttls(wire: Wire, model: Session, step: StartTls, target: Target) -> None:
    # Where STARTTLS cannot start TLS, what follows it is rightly read as commands: not pipelined then.
    pipelined = step.pipelined if not model.tls and model.used["STARTTLS"] == 0 else b""
    wire.send(b"STARTTLS\r\n" + pipelined)
    model.stats.commands += 1
    reply = wire.reply()
    model._count(reply)
    before = model.precheck(b"STARTTLS")
    if before is not None:
        model._expect("STARTTLS", reply, before)
        return
    if model.tls:
        # On the implicit-TLS port there is no STARTTLS; after one, its budget (1) is spent.
        model._expect("STARTTLS", reply, "454 TLS not available")
        return
    model._expect("STARTTLS", reply, "220 Ready to start TLS")
    if not wire.starttls(target.tls):
        # The pipelined bytes reached the TLS layer as a broken handshake: closed, never run.
        if not pipelined:
            raise ModelViolation("the TLS handshake after STARTTLS failed")
        model.closed = True
        return
    model.after_starttls()


def play_session(
    target: Target, account: Account, plan: SessionPlan, stats: Stats, *, timeout: float
) -> None:
    port = target.smtps_port if plan.implicit_tls else target.smtp_port
    wire = Wire(port, tls=target.tls if plan.implicit_tls else None, timeout=timeout)
    model = Session(account, target.max_size, plan.implicit_tls, stats)
    stats.sessions += 1
    try:
        greeting = wire.reply()
        if not greeting.startswith("220 "):
            raise ModelViolation(f"greeting {greeting!r}")
        for step in plan.steps:
            if isinstance(step, Command):
                _play_command(wire, model, step)
            elif isinstance(step, Auth):
                _play_auth(wire, model, step)
            elif isinstance(step, Data):
                _play_data(wire, model, step)
            else:
                _play_starttls(wire, model, step, target)
            if model.closed:
                if not wire.closed and wire.reply() != "":
                    raise ModelViolation(f"the server went on after closing, at {step}")
                return
            if wire.closed:
                raise ModelViolation(f"the server closed the connection at {step}")
    finally:
        wire.close()


# --- the store ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    queue_id: str
    mail_from: str
    recipients: list[str]
    data: bytes


def stored_for(database_url: str, user_name: str) -> tuple[list[Stored], int]:
    """Every message the store holds for ``user_name``, and its sent_total."""

    def read(conn: Connection) -> tuple[list[Stored], int]:
        user = conn.execute(
            sa.select(smtp_users.c.id, smtp_users.c.sent_total).where(smtp_users.c.name == user_name)
        ).one()
        rows = conn.execute(
            sa.select(messages.c.id, messages.c.queue_id, messages.c.mail_from)
            .where(messages.c.smtp_user_id == user.id)
            .order_by(messages.c.id)
        ).all()
        bodies = stored_bodies(conn, [row.id for row in rows])
        found = []
        for row in rows:
            addresses = conn.scalars(
                sa.select(recipients.c.address)
                .where(recipients.c.message_id == row.id)
                .order_by(recipients.c.id)
            ).all()
            found.append(Stored(row.queue_id, row.mail_from, list(addresses), bodies[row.id]))
        return found, int(user.sent_total)

    return store_read(database_url, read)


def check_store(target: Target, account: Account) -> None:
    stored, sent_total = stored_for(target.database_url, account.user.name)
    expected = {m.queue_id: m for m in account.sent}
    got = {m.queue_id: m for m in stored}
    if set(got) != set(expected):
        raise ModelViolation(f"stored {sorted(got)}, but 250 was answered for {sorted(expected)}")
    for queue_id, message in expected.items():
        held = got[queue_id]
        if (held.mail_from, held.recipients) != (message.mail_from, message.recipients):
            raise ModelViolation(
                f"{queue_id}: stored {held.mail_from!r} -> {held.recipients}, sent {message}"
            )
        if not held.data.endswith(normalized(message.content)) or not held.data.startswith(
            b"Received: from "
        ):
            raise ModelViolation(f"{queue_id}: stored content {held.data[-200:]!r} is not what was sent")
        if not held.data.count(b"\r") == held.data.count(b"\n") == held.data.count(b"\r\n"):
            raise ModelViolation(f"{queue_id}: a lone CR or LF was stored: {held.data[:300]!r}")
    if sent_total != account.recipients_sent():
        raise ModelViolation(f"sent_total {sent_total}, but {account.recipients_sent()} recipients got 250")


def send_normally(target: Target, user: SmtpUser, *, timeout: float) -> str:
    """A fresh, well-behaved session; returns the queue id (the server still works)."""
    wire = Wire(target.smtp_port, tls=None, timeout=timeout)
    try:
        answers = [wire.reply()]
        token = _b64(f"\0{user.name}\0{user.password}".encode()).decode()
        for line in (
            "EHLO canary.example",
            f"AUTH PLAIN {token}",
            "MAIL FROM:<c@example.com>",
            "RCPT TO:<d@example.com>",
        ):
            wire.send(line.encode() + b"\r\n")
            answers.append(wire.reply())
        wire.send(b"DATA\r\n")
        answers.append(wire.reply())
        wire.send(b"Subject: canary\r\n\r\nstill here\r\n.\r\n")
        answers.append(wire.reply())
    finally:
        wire.close()
    codes = [a[:3] for a in answers]
    if codes != ["220", "250", "235", "250", "250", "354", "250"]:
        raise ModelViolation(f"a normal session after the example got {answers}")
    return answers[-1].rsplit(" ", 1)[1]


def run_example(
    target: Target, example: Example, user: SmtpUser, stats: Stats, *, timeout: float = 15
) -> Account:
    """Plays ``example`` as ``user`` (fresh, with the example's limits) and checks all of it."""
    account = Account(user, example.total_limit, example.hourly_limit)
    stats.examples += 1
    for plan in example.sessions:
        play_session(target, account, plan, stats, timeout=timeout)
    check_store(target, account)
    return account
