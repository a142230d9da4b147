"""What the submission server does at each step of a session (aiosmtpd handler hooks).

AUTH checks an SMTP user's credentials against the store; MAIL re-checks that the user may still
send; RCPT makes the early limit check; the end of DATA makes the authoritative one and queues the
message in the same transaction, answering 250 only once it is on stable storage (SPEC §3, §4).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import sqlite3
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, TLSSetupException
from sqlalchemy.exc import SQLAlchemyError

from poweremail.domain.credentials import new_smtp_password
from poweremail.domain.limits import HOURLY_WINDOW, OverLimit, check_limits
from poweremail.domain.throttle import Busy, FailedLoginThrottle, LoginTicket, UserLoginThrottle
from poweremail.keyring import DecryptionError
from poweremail.services import Services
from poweremail.smtp import replies
from poweremail.smtp.message import new_queue_id, received_header, stamp
from poweremail.smtp.protocol import SubmissionSession, SubmissionSMTP
from poweremail.store import messages, smtp_users

logger = logging.getLogger("poweremail.smtp")

# RFC 4954 §4: after this many failures in one session the server may close the connection.
MAX_FAILED_LOGINS_PER_SESSION = 3
# Compared against when the user does not exist, so that costs what a wrong password costs.
_DUMMY_PASSWORD = new_smtp_password().encode()
# Errors that mean "the store is not there right now" rather than a bug. sqlite3's own errors too:
# one escaping a DATA hook would leave the session's transaction open (aiosmtpd resets it only
# after a reply from the hook), and every next MAIL would get 503.
_STORE_ERRORS = (SQLAlchemyError, sqlite3.Error, OSError, asyncio.TimeoutError)
# How long a login waits for checks in flight to free one of its name's failures (UserLoginThrottle).
ADMISSION_WAIT = 5.0
# RFC 5321 4.1.2: a Mailbox is Local-part "@" Domain, without control characters (atext, qtextSMTP and
# quoted-pairSMTP are printable; RFC 6531 3.3 adds UTF-8 only), and 4.5.3.1.3 allows a path of 256
# octets with its angle brackets. aiosmtpd's parser lets "<>" and "a" through as recipients, and CR,
# NUL, invalid UTF-8 (kept as surrogates) and any length anywhere: a bare CR went into our Received
# header and would go into the relay's RCPT line; NUL, a surrogate or a domain over 255 characters
# cannot be stored (451 and a traceback, for ever); a recipient without a domain cannot be delivered.
_NOT_IN_A_MAILBOX = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
MAX_PATH_OCTETS = 256


def _is_mailbox(address: str) -> bool:
    local_part, _, domain = address.rpartition("@")
    if not (local_part and domain) or _NOT_IN_A_MAILBOX.search(address):
        return False
    return len(address.encode()) + 2 <= MAX_PATH_OCTETS


@dataclass(frozen=True)
class SmtpIdentity:
    """Who a session logged in as. Never holds the password (aiosmtpd logs auth results)."""

    smtp_user_id: int
    name: str
    credential_version: int


def _decode_plain(blob: bytes) -> tuple[bytes, bytes] | None:
    """RFC 4616: authzid NUL authcid NUL passwd. We act only as the user itself (no proxy)."""
    parts = blob.split(b"\x00")
    if len(parts) != 3:
        return None
    authzid, login, password = parts
    if authzid and authzid != login:
        return None
    return login, password


def _identity(session: SubmissionSession) -> SmtpIdentity:
    # aiosmtpd only lets MAIL through once AUTH succeeded (auth_required=True).
    assert isinstance(session.auth_data, SmtpIdentity)
    return session.auth_data


class SubmissionHandler:
    def __dir__(self) -> list[str]:
        # As SubmissionSMTP.__dir__: aiosmtpd looks for the handler's auth_ and handle_ methods
        # with inspect.getmembers and dir on every new connection.
        return _HANDLER_HOOKS

    def __init__(
        self, *, services: Services, throttle: FailedLoginThrottle, user_throttle: UserLoginThrottle
    ) -> None:
        self._services = services
        self._throttle = throttle
        self._user_throttle = user_throttle
        self._check_ended = asyncio.Event()  # set (and replaced) whenever a user-throttled check ends
        self._hostname = services.settings.hostname

    # --- AUTH (RFC 4954); our own async mechanisms replace aiosmtpd's synchronous authenticator ---

    async def auth_PLAIN(self, server: SubmissionSMTP, args: list[str]) -> AuthResult:
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
        credentials = _decode_plain(blob)
        if credentials is None:
            await server.push("501 5.5.2 Cannot split the PLAIN credentials")
            return AuthResult(success=False, handled=True)
        return await self._check_credentials(server, *credentials)

    async def auth_LOGIN(self, server: SubmissionSMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth("Username:")
        else:
            try:
                login = b64decode(args[1], validate=True)
            except ValueError:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        if login is MISSING:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check_credentials(server, login, password)

    async def _check_credentials(self, server: SubmissionSMTP, login: bytes, password: bytes) -> AuthResult:
        session = server.submission_session()
        if self._throttle.is_blocked(server.client_host):
            return AuthResult(success=False, handled=False, message=replies.AUTH_THROTTLED)
        name = login.decode("utf-8", "replace")
        ticket = await self._admit(name, server.client_host)
        if ticket is None:  # this name's failures ran out: no verdict, right password or not
            logger.info("login not checked from %s: too many failures for that name", server.client_host)
            return AuthResult(success=False, handled=False, message=replies.AUTH_USER_THROTTLED)
        try:
            # One indexed statement, read on the event loop itself on SQLite (Database.read_now): it sees
            # every committed reset or disable, as a read in a thread does. Measured: a new connection
            # + AUTH per message, 2,212 -> 2,628 messages in 8 s (paired runs, medians of 4, 4 of 4).
            candidate = await self._services.database.read_now(
                lambda conn: smtp_users.find_login(conn, name=name, keyring=self._services.keyring)
            )
        except (*_STORE_ERRORS, DecryptionError):
            self._end_check(self._user_throttle.unanswered, ticket)
            logger.exception("login check failed for a client at %s", server.client_host)
            return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPORARY_FAILURE)
        except asyncio.CancelledError:  # the client left: it learnt nothing
            self._end_check(self._user_throttle.unanswered, ticket)
            raise
        expected = candidate.password.encode() if candidate is not None else _DUMMY_PASSWORD
        matches = hmac.compare_digest(expected, password)
        if candidate is not None and matches and candidate.may_send:
            self._end_check(self._user_throttle.succeeded, ticket)
            session.failed_logins = 0
            identity = SmtpIdentity(candidate.smtp_user_id, candidate.name, candidate.credential_version)
            logger.info("%s logged in from %s", candidate.name, server.client_host)
            return AuthResult(success=True, auth_data=identity)

        session.failed_logins += 1
        self._end_check(self._user_throttle.failed, ticket)
        delay = self._throttle.record_failure(server.client_host)
        logger.info("failed login from %s (%d in this session)", server.client_host, session.failed_logins)
        await asyncio.sleep(delay)
        if session.failed_logins >= MAX_FAILED_LOGINS_PER_SESSION:
            await server.close_with(replies.AUTH_TOO_MANY_IN_SESSION)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)

    async def _admit(self, name: str, client_host: str) -> LoginTicket | None:
        """A ticket to check this login, once the per-user throttle allows it; None: answer 454."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ADMISSION_WAIT
        while isinstance(admission := self._user_throttle.admit(name, client_host), Busy):
            ended = self._check_ended
            try:
                await asyncio.wait_for(ended.wait(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return None
        return admission

    def _end_check(self, outcome: Callable[[LoginTicket], None], ticket: LoginTicket) -> None:
        outcome(ticket)
        self._check_ended.set()  # logins waiting for a failure of this name look again
        self._check_ended = asyncio.Event()

    # --- the transaction ---------------------------------------------------------------------

    async def handle_EHLO(
        self,
        server: SubmissionSMTP,
        session: SubmissionSession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # RFC 2034 (we send enhanced codes) and RFC 2920 (aiosmtpd reads commands in order, and
        # drops buffered plaintext at STARTTLS, so pipelining is safe).
        return [*responses[:-1], "250-ENHANCEDSTATUSCODES", "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self,
        server: SubmissionSMTP,
        session: SubmissionSession,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if server.draining():  # the node is stopping: no new transaction (drain_sessions closes us)
            return replies.SHUTTING_DOWN
        if address != "<>" and not _is_mailbox(address):  # aiosmtpd keeps the null sender as "<>"
            return replies.BAD_SENDER
        identity = _identity(session)
        state = self._services.senders.fresh(identity.smtp_user_id)
        if state is None:
            try:
                now = datetime.now(UTC)
                state = await self._services.database.read(
                    lambda conn: messages.sender_state(conn, smtp_user_id=identity.smtp_user_id, now=now)
                )
            except _STORE_ERRORS:
                logger.exception("could not read the state of %s", identity.name)
                return replies.STORE_UNAVAILABLE
            self._services.senders.remember(identity.smtp_user_id, state)
        if state is None or not state.may_send or state.credential_version != identity.credential_version:
            # SPEC §4: disabled, deleted or reset mid-session: no new transaction, and no more
            # transactions on this login.
            session.authenticated = False
            logger.info(
                "%s may no longer send; session at %s must log in again", identity.name, server.client_host
            )
            return replies.CREDENTIALS_REVOKED
        session.sender = state
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: SubmissionSMTP,
        session: SubmissionSession,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= replies.MAX_RECIPIENTS:
            return replies.TOO_MANY_RECIPIENTS
        if not _is_mailbox(address):
            return replies.BAD_RECIPIENT
        state: messages.SenderState = session.sender
        # The early check, against usage read at MAIL; the authoritative one is at the end of DATA.
        # The recipients already accepted count as sent now: one more that does not fit beside them
        # can still go in a later message, so it is deferred (451), not refused for good.
        refusal = check_limits(
            limits=state.limits, usage=state.usage.plus(len(envelope.rcpt_tos)), recipients=1
        )
        if refusal is not None:
            if refusal.which == "hourly":
                refusal = await self._with_resume_time(refusal, session, state)
            return self._limit_reply(refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK

    async def handle_DATA(
        self, server: SubmissionSMTP, session: SubmissionSession, envelope: Envelope
    ) -> str:
        identity = _identity(session)
        queue_id = new_queue_id()
        now = datetime.now(UTC)
        protocol = ("ESMTPSA" if session.tls else "ESMTPA") if session.extended_smtp else "SMTP"
        received = received_header(
            helo=session.host_name,
            client_ip=server.client_host,
            hostname=self._hostname,
            protocol=protocol,
            queue_id=queue_id,
            recipients=envelope.rcpt_tos,
            now=now,
        )
        data = stamp(
            server.data_pieces,
            received=received,
            hostname=self._hostname,
            queue_id=queue_id,
            crlf_only=server.data_crlf_only,
        )
        # aiosmtpd keeps the null sender as "<>" (an empty value would mean "no MAIL yet").
        mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        request = messages.QueueRequest(
            smtp_user_id=identity.smtp_user_id,
            credential_version=identity.credential_version,
            queue_id=queue_id,
            mail_from=mail_from,
            rcpt_tos=envelope.rcpt_tos,
            data=data,
            now=now,
        )
        try:
            outcome = await self._services.submissions.queue(request)
        except _STORE_ERRORS:
            logger.exception("could not queue a message of %s", identity.name)
            return replies.STORE_UNAVAILABLE
        if isinstance(outcome, messages.Queued):
            self._services.mail_queued.set()
            logger.info(
                "%s queued %s: %d recipient(s), %d bytes",
                identity.name,
                queue_id,
                len(envelope.rcpt_tos),
                len(data),
            )
            return replies.QUEUED.format(queue_id=outcome.queue_id)
        if isinstance(outcome, OverLimit):
            return self._limit_reply(outcome)
        session.authenticated = False
        return replies.CREDENTIALS_REVOKED

    async def _with_resume_time(
        self, refusal: OverLimit, session: SubmissionSession, state: messages.SenderState
    ) -> OverLimit:
        identity, now = _identity(session), datetime.now(UTC)
        try:
            resume_at = await self._services.database.read(
                lambda conn: messages.hourly_resume_at(
                    conn,
                    smtp_user_id=identity.smtp_user_id,
                    usage=state.usage,
                    excess=refusal.excess,
                    now=now,
                )
            )
        except _STORE_ERRORS:
            logger.exception("could not read the hourly window of %s", identity.name)
            resume_at = now + HOURLY_WINDOW  # the latest it can be
        return replace(refusal, resume_at=resume_at)

    @staticmethod
    def _limit_reply(refusal: OverLimit) -> str:
        if refusal.which == "total":
            return replies.TOTAL_LIMIT.format(limit=refusal.limit)
        if refusal.excess == 0 or refusal.resume_at is None:
            return replies.HOURLY_LIMIT_NEVER.format(limit=refusal.limit)
        resume_at = (
            refusal.resume_at.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        )
        return replies.HOURLY_LIMIT.format(limit=refusal.limit, resume_at=resume_at)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The client sent STARTTLS and then no TLS handshake, or hung up: its failure, not ours
            # (aiosmtpd closes the connection and sends no reply).
            logger.info("TLS handshake failed: %r", error.__cause__)
            return replies.LOCAL_ERROR
        logger.error("SMTP session error: %s", type(error).__name__, exc_info=error)
        return replies.LOCAL_ERROR


_HANDLER_HOOKS = sorted(name for name in dir(SubmissionHandler) if name.startswith(("auth_", "handle_")))
