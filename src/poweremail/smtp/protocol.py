"""aiosmtpd's SMTP protocol with PowerEmail's per-connection policy.

Everything here uses aiosmtpd's extension points, as its maintainers intend them to be used:
``connection_made``/``connection_lost`` (per-address connection caps, the session deadline, whether
AUTH is allowed before TLS on this connection), ``_create_session`` (our session fields) and
``push`` (enhanced status codes on two of aiosmtpd's own replies). Why not aiosmtpd's own knobs:
``auth_require_tls`` is one value per server, but SPEC §4 exempts loopback clients, which only the
connection knows; and aiosmtpd has no notion of implicit TLS for AUTH.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Session

from poweremail.smtp import replies

logger = logging.getLogger("poweremail.smtp")


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
        super().__init__(handler, **kwargs)

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
