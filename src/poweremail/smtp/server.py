"""Starting the submission listeners on the node's event loop (``loop.create_server``, not
aiosmtpd's threaded Controller): STARTTLS on the submission port, implicit TLS on the second."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Final

from poweremail.domain.throttle import FailedLoginThrottle, UserLoginThrottle
from poweremail.services import Services
from poweremail.smtp.bulk_data import BulkDataBudget
from poweremail.smtp.handler import SubmissionHandler
from poweremail.smtp.protocol import ConnectionPolicy, SubmissionSMTP, drain_sessions
from poweremail.smtp.tls import certificate_paths, server_context

# Per session, per command (aiosmtpd's command_call_limit; over it: 421 and close). Commands that
# move mail get a budget no honest session reaches within the session timeout; commands that do
# not (Postfix calls them "junk": NOOP, VRFY, ...) a small one.
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


class _DropLoginDataDeprecation(logging.Filter):
    """aiosmtpd 1.4 itself sets its deprecated Session.login_data on every successful AUTH and
    logs a warning about it each time; that line says nothing about our server."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


@dataclass
class SubmissionServers:
    """The node's two listeners and the sessions they accepted."""

    listeners: list[asyncio.Server]
    policy: ConnectionPolicy

    async def stop(self, *, grace: float) -> int:
        """Accept nothing more, let open transactions finish for up to ``grace`` seconds, close every
        session; returns how many had to be cut off mid-transaction (see drain_sessions)."""
        for listener in self.listeners:
            listener.close()
        return await drain_sessions(self.policy, grace=grace)


async def start_smtp_servers(
    services: Services, *, submission_socket: socket.socket, smtps_socket: socket.socket
) -> SubmissionServers:
    settings = services.settings
    logging.getLogger("mail.log").addFilter(_DropLoginDataDeprecation())
    tls_context = server_context(*certificate_paths(settings))
    handler = SubmissionHandler(
        services=services,
        throttle=FailedLoginThrottle(
            max_failures=settings.failed_logins_per_address,
            window=settings.failed_login_window,
            block=settings.failed_login_block,
            delay_per_failure=settings.failed_login_delay,
        ),
        user_throttle=UserLoginThrottle(
            max_failures=settings.failed_logins_per_user, window=settings.failed_login_user_window
        ),
    )
    policy = ConnectionPolicy(
        max_connections_per_address=settings.max_connections_per_address,
        session_timeout=settings.smtp_session_timeout,
        plaintext_auth_on_loopback=settings.plaintext_auth_on_loopback,
        bulk_data=BulkDataBudget(rate=settings.large_message_rate) if settings.large_message_rate else None,
    )

    def protocol(*, implicit_tls: bool) -> SubmissionSMTP:
        return SubmissionSMTP(
            handler,
            policy=policy,
            implicit_tls=implicit_tls,
            tls_context=None if implicit_tls else tls_context,
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            hostname=settings.hostname,
            ident="PowerEmail ESMTP",
            timeout=settings.smtp_idle_timeout,
            auth_required=True,
            auth_require_tls=True,  # relaxed per connection: loopback, implicit TLS (protocol.py)
            command_call_limit=COMMAND_LIMITS,
        )

    loop = asyncio.get_running_loop()
    listeners = [
        await loop.create_server(lambda: protocol(implicit_tls=False), sock=submission_socket),
        await loop.create_server(lambda: protocol(implicit_tls=True), sock=smtps_socket, ssl=tls_context),
    ]
    return SubmissionServers(listeners, policy)
