"""One SMTP client connection to a relay or mail host, and one transaction on it.

A transaction reports per recipient: the reply to its ``RCPT`` if that refused it, else the reply
to the end of ``DATA``. Replies map to outcomes by their first digit (RFC 5321 §4.2.1): 2 delivered,
4 temporary, 5 permanent. A failure before the transaction (no connection, a refusing greeting,
EHLO, TLS or AUTH failing) is a :class:`HopFailure`: the caller tries the next host.

The conversation itself is smtp_client.py's: pipelined where the server offers it (RFC 2920), the
message dot-stuffed and any lone CR or LF turned into CRLF (RFC 5321 §4.5.2, §2.3.8), so what leaves
is never ambiguous about where it ends.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from poweremail.delivery.smtp_client import (
    MAIL_ACCEPTED,
    RCPT_ACCEPTED,
    Reply,
    ReplyTimeout,
    SmtpClient,
    SmtpClientError,
    data_for_the_wire,
)
from poweremail.domain.addresses import needs_smtputf8

TlsMode = Literal["none", "opportunistic", "starttls", "tls"]
Outcome = Literal["delivered", "temporary", "permanent"]


@dataclass(frozen=True)
class Hop:
    """One server to try, and how to talk to it."""

    connect_to: str  # an address (MX delivery resolves names itself) or the relay's host name
    port: int
    name: str  # the host's name: TLS server name, and what the records call it
    tls: TlsMode
    # Verified TLS toward a relay; opportunistic TLS toward MX hosts verifies nothing (RFC 7435):
    # plaintext would be the alternative.
    verify: bool = False
    ca_file: Path | None = None
    login: tuple[str, str] | None = field(default=None, repr=False)

    def describe(self) -> str:
        where = self.connect_to if self.connect_to == self.name else f"{self.name}[{self.connect_to}]"
        return f"{where}:{self.port}"


@dataclass(frozen=True)
class RecipientResult:
    address: str
    outcome: Outcome
    reply: str  # the remote reply ("550 5.1.1 no such user"), or why there was none
    remote: bool  # the reply came from the remote server (not a local decision)
    status: str | None = None  # the enhanced status of a local decision (RFC 3463)


class HopFailure(Exception):
    """The hop could not take a transaction: try the next one. ``permanent`` if its answer was 5xx."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class ConnectionLost(Exception):
    """The connection failed mid-transaction. ``data_sent``: the message may have been taken."""

    def __init__(self, reason: str, *, data_sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.data_sent = data_sent


def _path(address: str, encoding: str) -> bytes:
    """A reverse- or forward-path (RFC 5321 §4.1.2): the address in angle brackets, "<>" for none."""
    return b"<" + address.encode(encoding) + b">"


def _outcome(code: int) -> Outcome:
    if 200 <= code < 300:
        return "delivered"
    return "permanent" if 500 <= code < 600 else "temporary"


class OutboundConnection:
    """An open, greeted (and, as the hop asks, encrypted and logged-in) SMTP client connection."""

    def __init__(self, hop: Hop, client: SmtpClient) -> None:
        self.hop = hop
        self._client = client
        self.last_used = time.monotonic()
        self.transactions = 0

    @classmethod
    async def open(cls, hop: Hop, *, helo_name: str, reply_timeout: float) -> OutboundConnection:
        try:
            return await cls._open(hop, helo_name=helo_name, reply_timeout=reply_timeout, tls=hop.tls)
        except _TlsHandshakeFailed as exc:
            if hop.tls != "opportunistic":
                raise HopFailure(exc.reason) from None
            # Opportunistic TLS that fails its handshake falls back to plaintext, as Postfix does:
            # otherwise a host with a broken TLS setup could never get mail at all.
            return await cls._open(hop, helo_name=helo_name, reply_timeout=reply_timeout, tls="none")

    @classmethod
    async def _open(
        cls, hop: Hop, *, helo_name: str, reply_timeout: float, tls: TlsMode
    ) -> OutboundConnection:
        where = hop.describe()
        try:
            client, greeting = await SmtpClient.connect(
                hop.connect_to,
                hop.port,
                reply_timeout=reply_timeout,
                tls=_tls_context(hop) if tls == "tls" else None,
                server_name=hop.name,
            )
        except TimeoutError:
            raise HopFailure(f"no answer from {where} within {reply_timeout:g}s") from None
        except ReplyTimeout:
            raise HopFailure(f"{where} did not answer within {reply_timeout:g}s") from None
        except (OSError, SmtpClientError) as exc:
            raise HopFailure(f"connection to {where} failed: {_why(exc)}") from None
        try:
            _expect(greeting, 220, hop)
            await _greet(client, helo_name, hop)
            if tls in ("starttls", "opportunistic") and client.offers("starttls"):
                try:
                    _expect(await client.starttls(_tls_context(hop), hop.name), 220, hop)
                except (ssl.SSLError, OSError, TimeoutError, SmtpClientError) as exc:
                    client.close()
                    raise _TlsHandshakeFailed(f"TLS with {where} failed: {_why(exc)}") from None
                await _greet(client, helo_name, hop)
            elif tls == "starttls":
                raise HopFailure(f"{where} does not offer STARTTLS, which is required")
            if hop.login is not None:
                await _login(client, hop)
        except (HopFailure, _TlsHandshakeFailed):
            client.close()
            raise
        except ReplyTimeout:
            client.close()
            raise HopFailure(f"{where} did not answer within {reply_timeout:g}s") from None
        except (SmtpClientError, OSError) as exc:
            client.close()
            raise HopFailure(f"{where}: {_why(exc)}") from None
        return cls(hop, client)

    @property
    def is_open(self) -> bool:
        return self._client.is_open

    async def send(self, *, mail_from: str, recipients: Sequence[str], data: bytes) -> list[RecipientResult]:
        """One transaction. Raises ConnectionLost if the connection fails on the way."""
        self.last_used = time.monotonic()
        self.transactions += 1
        client, host = self._client, self.hop.describe()
        smtputf8 = needs_smtputf8(mail_from, *recipients)
        if smtputf8 and not client.offers("smtputf8"):
            why = f"{host} does not support SMTPUTF8, which this message's addresses need (RFC 6531)"
            return _refuse_all(recipients, why, status="5.6.7")
        max_size = client.extensions.get("size", "")
        if max_size.isdigit() and int(max_size) and len(data) > int(max_size):
            why = f"the message ({len(data)} bytes) is larger than {host} takes ({max_size} bytes)"
            return _refuse_all(recipients, why, status="5.3.4")
        options = []
        if client.offers("size"):
            options.append(f" SIZE={len(data)}")
        if client.offers("8bitmime") and not data.isascii():
            options.append(" BODY=8BITMIME")
        if smtputf8:
            options.append(" SMTPUTF8")
        encoding = "utf-8" if smtputf8 else "ascii"
        data_sent = False
        try:
            # Our addresses were checked as mailboxes when accepted, and go out as they came in.
            mail, rcpts, data_reply = await client.transaction(
                _path(mail_from, encoding) + "".join(options).encode(),
                [_path(address, encoding) for address in recipients],
                pipelining=client.offers("pipelining"),
            )
            if mail.code not in MAIL_ACCEPTED:
                refused = {address: _remote(address, mail) for address in recipients}
            else:
                refused = {
                    address: _remote(address, reply)
                    for address, reply in zip(recipients, rcpts, strict=True)
                    if reply.code not in RCPT_ACCEPTED
                }
            data_started = data_reply is not None and data_reply.code == 354
            if data_started and len(refused) < len(recipients):
                data_sent = True
                final = await client.send_data(data_for_the_wire(data))
            else:
                if data_started:
                    # A server that took DATA with no recipient: end it empty (RFC 2920 §3.1).
                    await client.send_data(b".\r\n")
                await self._reset()
                if len(refused) == len(recipients) or data_reply is None:
                    return [refused[address] for address in recipients]
                final = data_reply  # DATA itself refused: every accepted recipient gets its reply
        except (SmtpClientError, OSError) as exc:
            self._client.close()
            raise ConnectionLost(f"connection to {host} lost: {_why(exc)}", data_sent=data_sent) from None
        finally:
            self.last_used = time.monotonic()
        return [refused.get(address) or _remote(address, final) for address in recipients]

    async def _reset(self) -> None:
        """RSET after a refused transaction, so the connection can take the next one."""
        try:
            if not (await self._client.command(b"RSET")).positive:
                self._client.close()
        except (SmtpClientError, OSError):
            self._client.close()

    async def close(self) -> None:
        """QUIT politely; a connection that cannot is simply closed."""
        try:
            if self._client.is_open:
                async with asyncio.timeout(5):
                    await self._client.quit()
        except (SmtpClientError, OSError, TimeoutError):
            pass
        finally:
            self._client.close()


class _TlsHandshakeFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _remote(address: str, reply: Reply) -> RecipientResult:
    return RecipientResult(address, _outcome(reply.code), str(reply), remote=True)


def _refuse_all(recipients: Sequence[str], why: str, *, status: str) -> list[RecipientResult]:
    """A local, permanent refusal of every recipient: the message cannot go to this server as it is."""
    return [RecipientResult(address, "permanent", why, remote=False, status=status) for address in recipients]


def _expect(reply: Reply, code: int, hop: Hop) -> None:
    """A refusing greeting, EHLO or STARTTLS: this hop takes no mail now, or never if it said 5xx."""
    if reply.code != code:
        raise HopFailure(f"{hop.describe()} answered {reply}", permanent=reply.code >= 500)


async def _greet(client: SmtpClient, helo_name: str, hop: Hop) -> None:
    """EHLO, or HELO from a server that refuses EHLO (RFC 5321 §3.2)."""
    _expect(await client.hello(helo_name), 250, hop)


async def _login(client: SmtpClient, hop: Hop) -> None:
    assert hop.login is not None
    user, password = hop.login
    try:
        reply = await client.login(user, password)
    except ValueError as exc:
        # Our own login at the relay cannot work: the mail is not at fault, so never bounce it.
        raise HopFailure(f"login at {hop.describe()} impossible: it {exc}") from None
    if reply.code != 235:
        raise HopFailure(f"login at {hop.describe()} refused: {reply}")


def _tls_context(hop: Hop) -> ssl.SSLContext:
    if hop.verify:
        return ssl.create_default_context(cafile=str(hop.ca_file) if hop.ca_file else None)
    # Opportunistic TLS (RFC 7435): encrypted rather than plaintext, whoever the certificate names.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _why(exc: BaseException) -> str:
    """The operating system's reason ("connection refused"), not asyncio's "Connect call failed (…)"."""
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc)
