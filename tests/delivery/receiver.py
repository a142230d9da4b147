"""A scriptable receiving SMTP server for the delivery tests: real aiosmtpd on a loopback port.

    with Receiver(rcpt=lambda address, n: "451 4.3.0 try again later" if n <= 2 else None) as mx:
        ...  # start the worker with --relay mx.address (or --smtp-out-port mx.port behind DNS)
        [message] = mx.wait_for_messages(1)
        assert message.rcpt_tos == ["bob@example.test"]
        assert mx.rcpt_attempts == {"bob@example.test": 3}

Scripts (``rcpt``, ``mail``, ``data``; plain attributes, so a test may swap them while the receiver runs)
return a full reply line to refuse, or None for the usual 250; a 2xx line also accepts. They run on the
receiver's event-loop thread, so one at a time: a script that sleeps holds up every connection to this
receiver (a slow server that serves one transaction at a time). A script that raises, or returns
something that is not a reply line, is answered "451 4.3.0" and makes ``stop()`` (and leaving the
``with`` block) fail the test: a bug in a script must not pass for a temporary failure that the worker
then handled correctly.

With implicit TLS, a connection still in its handshake when the receiver stops is not cut (Python 3.11's
asyncio gives no handle on it before the handshake ends) and may surface as an unclosed-transport
ResourceWarning.

Why not aiosmtpd's ``Controller``: it cannot tell which port it got for port 0, and it checks readiness
by connecting to itself, a connection tests would count. Here the listening socket is bound on the
caller's thread (the port is known and a clash fails ``start()`` at once, and the kernel queues early
connections), and aiosmtpd's ``SMTP`` protocol serves it on an event loop in a thread of our own.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

MailScript = Callable[[str, int], str | None]  # (sender, n) → reply line or None; sender "" is <>
RcptScript = Callable[[str, int], str | None]  # (address, n) → reply line or None
DataScript = Callable[[int], str | None]  # (n) → reply line or None

_REPLY_LINE = re.compile(r"[2-5][0-9][0-9]( |$)")
_SCRIPT_FAILED = "451 4.3.0 Receiver script failed (see the test's failure)"


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str  # "" for the null reverse-path (MAIL FROM:<>), as PowerEmail stores it
    rcpt_tos: list[str]  # the recipients this transaction accepted, as the client spelled them
    data: bytes  # exactly what arrived after DATA, dot-unstuffed, CRLF line ends kept
    peer: str  # the client's IP address
    tls: bool  # STARTTLS or implicit TLS
    auth_user: str | None
    connection_id: int  # 1, 2, ... in the order this receiver accepted connections


def free_port_on(*hosts: str) -> int:
    """A TCP port free on every one of ``hosts`` (default 127.0.0.1). --smtp-out-port is one number
    for every MX host, so MX tests put receivers on the same port of different loopback addresses."""
    hosts = hosts or ("127.0.0.1",)
    for _ in range(100):
        with ExitStack() as stack:
            first = stack.enter_context(socket.socket(_family(hosts[0])))
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            try:
                for host in hosts[1:]:
                    stack.enter_context(socket.socket(_family(host))).bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def server_tls_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server context with a certificate from ``ca`` for ``names`` (default localhost and 127.0.0.1),
    for ``starttls_context`` or ``implicit_tls_context``; clients trust it with ``ca.configure_trust``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("localhost", "127.0.0.1"))).configure_cert(context)
    return context


class Receiver:
    """A receiving SMTP server (an MX host or a relay) that records what it accepts.

    ``greeting``: a 4xx/5xx line answered instead of 220; the server then answers 503 to every command
    but QUIT (RFC 5321 §3.1). ``auth=(user, password)``: AUTH PLAIN and LOGIN are offered, also without
    TLS (loopback), and required before MAIL; without it no AUTH is advertised and none succeeds.
    ``pipelining``: PIPELINING is advertised (RFC 2920), as most servers do; aiosmtpd reads pipelined
    commands one by one either way.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rcpt: RcptScript | None = None,
        mail: MailScript | None = None,
        data: DataScript | None = None,
        smtputf8: bool = True,
        starttls_context: ssl.SSLContext | None = None,
        implicit_tls_context: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        greeting: str | None = None,
        pipelining: bool = True,
    ) -> None:
        if starttls_context is not None and implicit_tls_context is not None:
            raise ValueError("STARTTLS on an implicit TLS connection makes no sense: pass one context")
        if greeting is not None and not re.match(r"[45][0-9][0-9] ", greeting):
            raise ValueError(f"greeting is for refusing connections (4xx/5xx), not {greeting!r}")
        self.host = host
        self.port = port
        self.rcpt = rcpt
        self.mail = mail
        self.data = data
        self.greeting = greeting
        self.smtputf8 = smtputf8
        self.starttls_context = starttls_context
        self.implicit_tls_context = implicit_tls_context
        self.auth = auth
        self.pipelining = pipelining
        self._changed = threading.Condition()  # guards the records below; notified on every change
        self._messages: list[ReceivedMessage] = []
        self._connections = 0
        self._mail_attempts: Counter[str] = Counter()
        self._rcpt_attempts: Counter[str] = Counter()
        self._data_attempts = 0
        self._errors: list[str] = []
        self._handler = _Handler(self)
        # Touched on the server thread only.
        self._live: set[_ReceiverSMTP] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread_error: BaseException | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # --- what arrived -------------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._changed:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """Connections accepted, including refused-greeting ones and failed STARTTLS ones (with implicit
        TLS a connection counts once its handshake succeeded)."""
        with self._changed:
            return self._connections

    @property
    def rcpt_attempts(self) -> dict[str, int]:
        """RCPT commands per address, accepted or refused (aiosmtpd's own syntax refusals aside)."""
        with self._changed:
            return dict(self._rcpt_attempts)

    @property
    def mail_attempts(self) -> dict[str, int]:
        """MAIL commands per sender ("" for <>), accepted or refused (not ones refused for want of AUTH)."""
        with self._changed:
            return dict(self._mail_attempts)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of scripts that raised or returned something that is not a reply line, and of
        exceptions inside the receiver itself."""
        with self._changed:
            return list(self._errors)

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Blocks until ``predicate()`` holds (it may read this receiver's properties; it is checked on
        every change); AssertionError saying what arrived on timeout."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise AssertionError(f"{self.address}: no {what} within {timeout}s; {self._summary()}")

    def wait_for_messages(self, n: int, timeout: float = 30) -> list[ReceivedMessage]:
        """At least ``n`` messages (transactions) accepted; returns all of them."""
        self.wait_until(lambda: len(self._messages) >= n, f"{n} message(s)", timeout)
        return self.messages

    def wait_for_recipients(self, n: int, timeout: float = 30) -> list[ReceivedMessage]:
        """At least ``n`` recipients accepted, summed over completed messages; returns the messages."""
        self.wait_until(
            lambda: sum(len(m.rcpt_tos) for m in self._messages) >= n, f"{n} delivered recipient(s)", timeout
        )
        return self.messages

    def wait_for_rcpt_attempts(self, address: str, n: int, timeout: float = 30) -> None:
        self.wait_until(lambda: self._rcpt_attempts[address] >= n, f"{n} RCPT(s) of {address}", timeout)

    def wait_for_connections(self, n: int, timeout: float = 30) -> None:
        self.wait_until(lambda: self._connections >= n, f"{n} connection(s)", timeout)

    def _summary(self) -> str:
        messages = [(m.mail_from, m.rcpt_tos) for m in self._messages]
        summary = (
            f"connections={self._connections} messages={messages} "
            f"mail_attempts={dict(self._mail_attempts)} rcpt_attempts={dict(self._rcpt_attempts)}"
        )
        return summary + (f"\nscript errors:\n{''.join(self._errors)}" if self._errors else "")

    # --- starting and stopping ----------------------------------------------------------------

    def start(self) -> Receiver:
        """Binds and serves; after ``stop()`` it starts again on the same port (a host coming back)."""
        if self._thread is not None:
            raise RuntimeError(f"receiver {self.address} already started")
        sock = socket.create_server((self.host, self.port), family=_family(self.host), backlog=128)
        self.port = int(sock.getsockname()[1])
        ready = threading.Event()
        self._thread_error = None
        self._thread = threading.Thread(
            target=self._run, args=(sock, ready), name=f"receiver {self.address}", daemon=True
        )
        self._thread.start()
        if not ready.wait(30) or self._thread_error is not None:
            self._thread.join(10)
            self._thread = None
            raise RuntimeError(f"receiver {self.address} did not start") from self._thread_error
        return self

    def stop(self) -> None:
        """Stops serving (open connections are cut), then fails if a script went wrong."""
        self._shutdown()
        self.check()

    def check(self) -> None:
        with self._changed:
            if self._errors:
                raise AssertionError(f"receiver {self.address}: scripts failed:\n{''.join(self._errors)}")

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._shutdown()
        if exc_type is None:  # a script error must not hide the test's own failure
            self.check()

    def _shutdown(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None:
            loop.call_soon_threadsafe(stop_event.set)
        thread.join(30)
        if thread.is_alive():
            raise RuntimeError(f"receiver {self.address} did not stop")

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(sock, ready))
        except BaseException as exc:
            self._thread_error = exc
        finally:
            ready.set()

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._stop_event = loop, asyncio.Event()
        try:
            server = await loop.create_server(self._protocol, sock=sock, ssl=self.implicit_tls_context)
        except BaseException:
            sock.close()
            raise
        ready.set()
        await self._stop_event.wait()
        server.close()
        # Cut the connections still open (their clients may be hung, or gone for good), and let their
        # connection_lost run before asyncio.run closes the loop: no unclosed-transport warnings.
        for protocol in list(self._live):
            protocol.abort()
        await server.wait_closed()
        for _ in range(200):
            if not self._live:
                break
            await asyncio.sleep(0.005)

    def _protocol(self) -> _ReceiverSMTP:
        assert self._loop is not None
        return _ReceiverSMTP(
            self,
            self._handler,
            loop=self._loop,
            hostname="receiver.test",  # aiosmtpd's default asks socket.getfqdn(), on every connection
            ident="PowerEmail test receiver",
            enable_SMTPUTF8=self.smtputf8,
            tls_context=self.starttls_context,
            # Not auth_required: aiosmtpd warns (an error under pytest) when AUTH is required without TLS.
            # handle_MAIL requires it instead.
            auth_require_tls=False,
            authenticator=self._authenticate,
        )

    # --- called on the server thread ----------------------------------------------------------

    def _connected(self, protocol: _ReceiverSMTP) -> int:
        self._live.add(protocol)
        with self._changed:
            self._connections += 1
            self._changed.notify_all()
            return self._connections

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if (
            self.auth is not None
            and isinstance(auth_data, LoginPassword)
            and (auth_data.login, auth_data.password) == (self.auth[0].encode(), self.auth[1].encode())
        ):
            return AuthResult(success=True, auth_data=self.auth[0])
        return AuthResult(success=False, handled=False)

    def _record_error(self, error: str) -> None:
        with self._changed:
            self._errors.append(error)
            self._changed.notify_all()

    def _count(self, counter: Counter[str], key: str) -> int:
        with self._changed:
            counter[key] += 1
            self._changed.notify_all()
            return counter[key]

    def _script(self, name: str, script: Callable[..., str | None] | None, *args: Any) -> str | None:
        if script is None:
            return None
        try:
            reply = script(*args)
            if reply is not None and not (isinstance(reply, str) and _REPLY_LINE.match(reply)):
                raise ValueError(f"not a reply line: {reply!r}")
        except Exception:
            self._record_error(f"{name} script, arguments {args!r}:\n{traceback.format_exc()}")
            return _SCRIPT_FAILED
        return reply

    def _on_mail(self, sender: str) -> str | None:
        return self._script("mail", self.mail, sender, self._count(self._mail_attempts, sender))

    def _on_rcpt(self, address: str) -> str | None:
        return self._script("rcpt", self.rcpt, address, self._count(self._rcpt_attempts, address))

    def _on_data(self, protocol: _ReceiverSMTP, session: Session, envelope: Envelope) -> str | None:
        with self._changed:
            self._data_attempts += 1
            n = self._data_attempts
        reply = self._script("data", self.data, n)
        if _accepts(reply):
            assert envelope.mail_from is not None and envelope.original_content is not None
            peer: Any = session.peer  # aiosmtpd's annotation says str; it is the (host, port, ...) tuple
            message = ReceivedMessage(
                mail_from=_sender(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                data=envelope.original_content,
                peer=str(peer[0]),
                tls=protocol.uses_tls(),
                auth_user=session.auth_data if session.authenticated else None,
                connection_id=protocol.connection_id,
            )
            with self._changed:
                self._messages.append(message)
                self._changed.notify_all()
        return reply


class _Handler:
    """aiosmtpd's hooks. A separate object: aiosmtpd inspects every attribute of its handler."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # with a (5-argument) EHLO hook aiosmtpd leaves this to the hook
        if self._receiver.auth is None:  # aiosmtpd always offers AUTH when auth_require_tls is off
            responses = [line for line in responses if not line[4:].upper().startswith("AUTH")]
        if self._receiver.pipelining:
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self._receiver.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = self._receiver._on_mail(_sender(address))
        if _accepts(reply):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._receiver._on_rcpt(address)
        if _accepts(reply):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(server, _ReceiverSMTP)
        return self._receiver._on_data(server, session, envelope) or "250 2.0.0 OK"

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's default logs a traceback at ERROR and answers "500 Error: ...". A failed TLS
        handshake or a client gone mid-reply is a test's business (aiosmtpd closes the connection); any
        other exception is a bug in this harness and fails the test like a script's."""
        if not isinstance(error, TLSSetupException | OSError):
            exception = traceback.format_exception(error)
            self._receiver._record_error(f"receiver raised:\n{''.join(exception)}")
        return "451 4.3.0 Receiver error"


class _ReceiverSMTP(SMTP):
    """aiosmtpd's protocol, numbering its connection and able to refuse at the greeting."""

    def __init__(self, receiver: Receiver, handler: _Handler, **kwargs: Any) -> None:
        # Set before aiosmtpd's __init__, which inspects every attribute of the instance.
        self._receiver = receiver
        self._raw_transport: asyncio.Transport | None = None
        self.connection_id = 0
        super().__init__(handler, **kwargs)

    def uses_tls(self) -> bool:
        # A method, not a property: aiosmtpd's __init__ evaluates every property of the instance.
        return self._receiver.implicit_tls_context is not None or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # aiosmtpd calls this again after STARTTLS, on the same connection
        super().connection_made(transport)
        if first:
            assert isinstance(transport, asyncio.Transport)
            self._raw_transport = transport
            self.connection_id = self._receiver._connected(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._receiver._live.discard(self)

    def abort(self) -> None:
        if self._raw_transport is not None:
            self._raw_transport.abort()

    async def _handle_client(self) -> None:
        greeting = self._receiver.greeting
        if greeting is None:
            await super()._handle_client()
            return
        # RFC 5321 §3.1: after refusing in the greeting the server waits for QUIT, answering 503 meanwhile.
        try:
            await self.push(greeting)
            while self.transport is not None:
                line = await self._reader.readuntil()
                if line.rstrip(b"\r\n").upper() == b"QUIT":
                    await self.push("221 2.0.0 Bye")
                    break
                await self.push("503 5.5.1 No SMTP service here")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            if self.transport is not None:
                self.transport.close()


def _accepts(reply: str | None) -> bool:
    return reply is None or reply.startswith("2")


def _sender(address: str) -> str:
    return "" if address == "<>" else address  # aiosmtpd keeps the null reverse-path as "<>"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
