"""The "bare SMTP server": the same SMTP stack as ``poweremail serve --roles smtp``, doing no work.

bench/smtp.py measures it next to PowerEmail's submission port, so the ratio of the two says how much
of a message's cost is PowerEmail's own (the store, limit checks, the Received header, policy) and
how much is the stack (asyncio streams, aiosmtpd's command parsing and DATA reading), which no change
to PowerEmail short of replacing aiosmtpd can remove.

Like PowerEmail it runs aiosmtpd's SMTP protocol on ``loop.create_server`` in the main event loop
(not aiosmtpd's threaded Controller), requires AUTH, and checks AUTH PLAIN in an async ``auth_PLAIN``
handler method; but against one fixed user in memory, and it discards every message with "250 OK".

Run: ``python bench/bare_smtp.py --port 2599``; log in as ``bench`` / ``bench-password``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
import socket
import warnings
from base64 import b64decode
from typing import Final

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

USER: Final = b"bench"
PASSWORD: Final = b"bench-password"
# PowerEmail's defaults (poweremail.config.Settings), so both sides parse and buffer alike.
DATA_SIZE_LIMIT: Final = 25 * 1024 * 1024
IDLE_TIMEOUT_S: Final = 300.0
# The same per-command budgets as poweremail.smtp.server.COMMAND_LIMITS (aiosmtpd counts every
# command against them), copied rather than imported so the bare server needs nothing of PowerEmail.
COMMAND_LIMITS: Final = {
    "*": 100_000,
    "NOOP": 100,
    "HELP": 20,
    "VRFY": 20,
    "EXPN": 20,
    "HELO": 20,
    "EHLO": 20,
    "AUTH": 10,
    "STARTTLS": 1,
}


class _QuietAiosmtpdWarnings(logging.Filter):
    """aiosmtpd logs a warning on every connection (AUTH without TLS) and every login (its deprecated
    login_data); PowerEmail filters or avoids both, so the bare server must not pay for writing them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "login_data is deprecated" not in message and "auth_require_tls == False" not in message


class BareHandler:
    """Authenticates one fixed user and accepts every message without looking at it."""

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        # The same steps as PowerEmail's auth_PLAIN (decode, split, constant-time compare), minus
        # the store: the difference between the two is then the store and nothing else.
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1], validate=True)
            except ValueError:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            await server.push("501 5.5.2 Cannot split the PLAIN credentials")
            return AuthResult(success=False, handled=True)
        _authzid, login, password = parts
        if login == USER and hmac.compare_digest(password, PASSWORD):
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


def smtp_protocol(handler: BareHandler, hostname: str) -> SMTP:
    return SMTP(
        handler,
        data_size_limit=DATA_SIZE_LIMIT,
        enable_SMTPUTF8=True,
        hostname=hostname,
        ident="bare ESMTP",
        timeout=IDLE_TIMEOUT_S,
        auth_required=True,
        auth_require_tls=False,  # loopback only, as PowerEmail allows for loopback clients
        command_call_limit=COMMAND_LIMITS,
    )


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = BareHandler()
    # Resolved once, as PowerEmail's Settings does; aiosmtpd would otherwise call getfqdn() (a DNS
    # lookup) on every connection.
    hostname = socket.getfqdn()
    server = await loop.create_server(lambda: smtp_protocol(handler, hostname), host=host, port=port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # What `poweremail serve --log-level WARNING` sets up, so logging costs both sides the same.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mail.log").addFilter(_QuietAiosmtpdWarnings())
    # aiosmtpd also warns (warnings.warn, printed to stderr every time) on each connection when AUTH
    # does not require TLS; PowerEmail relaxes that per connection instead and never sees it.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
