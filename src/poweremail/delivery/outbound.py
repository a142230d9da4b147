"""One SMTP client connection to a relay or mail host, and one transaction on it (aiosmtplib).

A transaction reports per recipient: the reply to its ``RCPT`` if that refused it, else the reply
to the end of ``DATA``. Replies map to outcomes by their first digit (RFC 5321 §4.2.1): 2 delivered,
4 temporary, 5 permanent. A failure before the transaction (no connection, a refusing greeting,
EHLO, TLS or AUTH failing) is a :class:`HopFailure`: the caller tries the next host.

aiosmtplib's ``data`` dot-stuffs the message and turns any lone CR or LF into CRLF (RFC 5321
§4.5.2, §2.3.8), so what leaves is never ambiguous about where it ends.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiosmtplib

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


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    return _reply_text(exc.code, exc.message)


def _reply_text(code: int, message: str) -> str:
    text = " ".join(message.split())  # a multi-line reply on one line, no CR or LF
    return f"{code} {text}".strip()


def _path(address: str, encoding: str) -> bytes:
    """A reverse- or forward-path (RFC 5321 §4.1.2): the address in angle brackets, "<>" for none."""
    return b"<" + address.encode(encoding) + b">"


def _outcome(code: int) -> Outcome:
    if 200 <= code < 300:
        return "delivered"
    return "permanent" if 500 <= code < 600 else "temporary"


_NETWORK_ERRORS = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError, ssl.SSLError)


class OutboundConnection:
    """An open, greeted (and, as the hop asks, encrypted and logged-in) SMTP client connection."""

    def __init__(self, hop: Hop, client: aiosmtplib.SMTP) -> None:
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
        client = aiosmtplib.SMTP(
            hostname=hop.connect_to,
            port=hop.port,
            local_hostname=helo_name,
            timeout=reply_timeout,
            use_tls=tls == "tls",
            start_tls=False,
            validate_certs=hop.verify,
            cert_bundle=str(hop.ca_file) if hop.ca_file else None,
        )
        try:
            # With implicit TLS, aiosmtplib takes connect_to as the server name (relays are named).
            await client.connect()
            await _greet(client)
            if tls in ("starttls", "opportunistic") and client.supports_extension("starttls"):
                try:
                    await client.starttls(server_hostname=hop.name, validate_certs=hop.verify)
                except (ssl.SSLError, aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
                    client.close()
                    raise _TlsHandshakeFailed(f"TLS with {hop.describe()} failed: {exc}") from None
                await _greet(client)
            elif tls == "starttls":
                raise HopFailure(f"{hop.describe()} does not offer STARTTLS, which is required")
            if hop.login is not None:
                user, password = hop.login
                await client.login(user, password)
        except (HopFailure, _TlsHandshakeFailed):
            client.close()
            raise
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            client.close()
            raise _hop_failure(exc, hop, reply_timeout) from None
        return cls(hop, client)

    @property
    def is_open(self) -> bool:
        return self._client.is_connected

    async def send(self, *, mail_from: str, recipients: Sequence[str], data: bytes) -> list[RecipientResult]:
        """One transaction. Raises ConnectionLost if the connection fails on the way."""
        self.last_used = time.monotonic()
        self.transactions += 1
        client, host = self._client, self.hop.describe()
        smtputf8 = needs_smtputf8(mail_from, *recipients)
        if smtputf8 and not client.supports_extension("smtputf8"):
            why = f"{host} does not support SMTPUTF8, which this message's addresses need (RFC 6531)"
            return _refuse_all(recipients, why, status="5.6.7")
        max_size = client.esmtp_extensions.get("size", "")
        if max_size.isdigit() and int(max_size) and len(data) > int(max_size):
            why = f"the message ({len(data)} bytes) is larger than {host} takes ({max_size} bytes)"
            return _refuse_all(recipients, why, status="5.3.4")
        options = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        if client.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if smtputf8:
            options.append("SMTPUTF8")
        encoding = "utf-8" if smtputf8 else "ascii"
        data_sent = False
        try:
            # MAIL and RCPT written here rather than by aiosmtplib's mail() and rcpt(), which parse
            # each address again with the email package (7% of a busy delivery process's samples);
            # ours were checked as mailboxes when accepted, and go out as they came in.
            response = await client.execute_command(
                b"MAIL", b"FROM:" + _path(mail_from, encoding), *(option.encode() for option in options)
            )
            if response.code != 250:
                await self._reset()
                reply = _reply_text(response.code, response.message)
                return [RecipientResult(a, _outcome(response.code), reply, remote=True) for a in recipients]
            refused: dict[str, RecipientResult] = {}
            for address in recipients:
                response = await client.execute_command(b"RCPT", b"TO:" + _path(address, encoding))
                if response.code not in (250, 251):  # 251: "user not local; will forward" (RFC 5321 §3.4)
                    reply = _reply_text(response.code, response.message)
                    refused[address] = RecipientResult(address, _outcome(response.code), reply, remote=True)
            accepted = [address for address in recipients if address not in refused]
            if not accepted:
                await self._reset()
                return [refused[address] for address in recipients]
            data_sent = True
            try:
                response = await client.data(data)
                outcome, reply = _outcome(response.code), _reply_text(response.code, response.message)
            except aiosmtplib.SMTPResponseException as exc:
                outcome, reply = _outcome(exc.code), _reply(exc)
        except _NETWORK_ERRORS as exc:
            self._client.close()
            raise ConnectionLost(f"connection to {host} lost: {exc}", data_sent=data_sent) from None
        finally:
            self.last_used = time.monotonic()
        return [
            refused.get(address) or RecipientResult(address, outcome, reply, remote=True)
            for address in recipients
        ]

    async def _reset(self) -> None:
        """RSET after a refused transaction, so the connection can take the next one."""
        try:
            await self._client.rset()
        except (aiosmtplib.SMTPException, *_NETWORK_ERRORS):
            self._client.close()

    async def close(self) -> None:
        """QUIT politely; a connection that cannot is simply closed."""
        try:
            if self._client.is_connected:
                await self._client.quit(timeout=5)
        except (aiosmtplib.SMTPException, *_NETWORK_ERRORS):
            pass
        finally:
            self._client.close()


class _TlsHandshakeFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _refuse_all(recipients: Sequence[str], why: str, *, status: str) -> list[RecipientResult]:
    """A local, permanent refusal of every recipient: the message cannot go to this server as it is."""
    return [RecipientResult(address, "permanent", why, remote=False, status=status) for address in recipients]


def _hop_failure(exc: BaseException, hop: Hop, reply_timeout: float) -> HopFailure:
    """What went wrong before a transaction could start, in words for the recipient's last_reply."""
    where = hop.describe()
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        # Our own credentials at the relay are wrong: the mail is not at fault, so never bounce it.
        return HopFailure(f"login at {where} refused: {_reply(exc)}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):  # a refusing greeting, EHLO or STARTTLS
        return HopFailure(f"{where} answered {_reply(exc)}", permanent=exc.code >= 500)
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        return HopFailure(f"no answer from {where} within {reply_timeout:g}s")
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return HopFailure(f"connection to {where} failed: {_why(exc)}")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return HopFailure(f"{where} did not answer within {reply_timeout:g}s")
    if isinstance(exc, OSError) and not isinstance(exc, aiosmtplib.SMTPException):
        return HopFailure(f"connection to {where} failed: {exc.strerror or exc}")
    return HopFailure(f"{where}: {exc}")


def _why(exc: BaseException) -> str:
    """The operating system's reason ("Connection refused"), not aiosmtplib's wrapping of it."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError) and cause.errno is not None:
        return os.strerror(cause.errno).lower()  # asyncio's own text is "Connect call failed (…)"
    return str(cause or exc)


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO from a server that refuses EHLO (RFC 5321 §3.2)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        await client.helo()
