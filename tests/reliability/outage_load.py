"""Steady load on a node while its store goes away: SMTP sessions sending, new logins, an API client
calling, and a record of every reply with the moments it was asked for and answered.

Each sender is one thread on one raw SMTP session (``tests.smtp.raw``) that sends letters of 1-3
recipients back to back; a refused step is tried again on the same session after a short pause, and a
closed session is opened again. A prober opens a new session, logs in and quits, again and again. The
API client alternates a read (``listSmtp``) and a write (``editSmtp``, writing the limit the user
already has). No letter is sent twice: what the store holds matches the replies one to one.
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from tests.smtp.helpers import SmtpUser
from tests.smtp.letters import QUEUED_PREFIX, Letter, QueuedMessage
from tests.smtp.raw import RawSMTP
from tests.support import Owner, ServerProcess

Stage = Literal["connect", "AUTH", "LOGIN", "MAIL", "RCPT", "DATA"]  # LOGIN: the prober's AUTH
PAUSE_AFTER_REFUSAL = 0.05  # seconds a sender waits before trying a refused step again
PROBE_EVERY = 0.2  # seconds between the prober's logins
PROBER = -1  # the sender number of the prober's replies
# A letter body of 3 MB (998-octet lines): more than SQLite's page cache (2 MB), so storing it writes
# to disk mid-transaction, where a failing write makes SQLite roll back the whole group-commit batch.
LARGE_BODY = b"".join(b"%0998d\r\n" % n for n in range(3000))
_SUBJECT = re.compile(rb"^Subject: ([0-9a-f]{32})\r$", re.MULTILINE)


@dataclass(frozen=True)
class SmtpReply:
    sender: int
    stage: Stage
    reply: str  # "" when the server closed the connection (or it broke) instead of answering
    asked_at: float  # time.monotonic() when the command (for DATA: the final dot) was sent
    answered_at: float
    letter: Letter | None = None

    @property
    def code(self) -> str:
        return self.reply[:3] if self.reply[:3].isdigit() else "closed"

    @property
    def queue_id(self) -> str | None:
        if self.stage == "DATA" and self.reply.startswith(QUEUED_PREFIX):
            return self.reply.removeprefix(QUEUED_PREFIX)
        return None


@dataclass(frozen=True)
class ApiReply:
    call: str
    status: int  # 0: no HTTP answer at all
    body: dict[str, Any]
    asked_at: float
    answered_at: float


@dataclass
class SteadyLoad:
    """``senders`` SMTP sessions, a login prober and an API client against ``node``."""

    node: ServerProcess
    owner: Owner
    user: SmtpUser
    senders: int = 4
    total_limit: int = 1_000_000  # the SMTP user's; editSmtp writes it again and again
    api_pause: float = 0.05
    # Appended to the letters of the first sender only: a large one (a few MB) does not fit in SQLite's
    # page cache, so storing it writes to disk in the middle of the transaction, not only at COMMIT.
    first_sender_body: bytes = b""
    smtp_replies: list[SmtpReply] = field(default_factory=list)
    api_replies: list[ApiReply] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failures: list[BaseException] = []

    # --- running ----------------------------------------------------------------------------------

    def start(self) -> SteadyLoad:
        targets: list[Callable[[], None]] = [
            *(functools.partial(self._send, n) for n in range(self.senders)),
            self._probe_logins,
            self._call_api,
        ]
        self._threads = [
            threading.Thread(target=self._guarded, args=(target,), name=f"outage-load-{i}", daemon=True)
            for i, target in enumerate(targets)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        if self._failures:
            raise AssertionError(f"a load thread failed: {self._failures[0]!r}") from self._failures[0]

    def _guarded(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as error:
            with self._lock:
                self._failures.append(error)

    def _record(self, reply: SmtpReply) -> SmtpReply:
        with self._lock:
            self.smtp_replies.append(reply)
        return reply

    def _connect(self, sender: int) -> RawSMTP | None:
        asked = time.monotonic()
        try:
            client = RawSMTP(self.node.smtp_port, timeout=30)
        except OSError as error:
            self._record(SmtpReply(sender, "connect", f"({error})", asked, time.monotonic()))
            return None
        self._record(SmtpReply(sender, "connect", client.greeting, asked, time.monotonic()))
        return client

    def _send(self, sender: int) -> None:
        numbers = itertools.count(sender, self.senders)
        body = self.first_sender_body if sender == 0 else b""
        while not self._stop.is_set():
            client = self._connect(sender)
            if client is None:
                time.sleep(PAUSE_AFTER_REFUSAL)
                continue
            with client:
                try:
                    self._session(sender, client, numbers, body)
                except OSError:
                    pass  # the session broke: open a new one

    def _session(self, sender: int, client: RawSMTP, numbers: Iterator[int], body: bytes) -> None:
        def step(stage: Stage, line: str | bytes, letter: Letter | None = None) -> SmtpReply:
            asked = time.monotonic()
            reply = client.command(line)
            return self._record(SmtpReply(sender, stage, reply, asked, time.monotonic(), letter))

        while True:
            if self._stop.is_set():
                return
            asked = time.monotonic()
            reply = client.login(self.user.name, self.user.password)
            login = self._record(SmtpReply(sender, "AUTH", reply, asked, time.monotonic()))
            if login.code == "235":
                break
            if login.code == "closed":
                return
            time.sleep(PAUSE_AFTER_REFUSAL)
        while not self._stop.is_set():
            mail = step("MAIL", "MAIL FROM:<sender@example.com>")
            if mail.code == "closed":
                return
            if mail.code != "250":
                time.sleep(PAUSE_AFTER_REFUSAL)
                continue
            letter = Letter.to(1 + next(numbers) % 3)
            for address in letter.recipients:
                rcpt = step("RCPT", f"RCPT TO:<{address}>")
                if rcpt.code == "closed":
                    return
                assert rcpt.code == "250", rcpt  # RCPT reads nothing from the store under these limits
            go_ahead = client.command("DATA")
            if not go_ahead:
                return
            assert go_ahead.startswith("354"), go_ahead
            data = step("DATA", letter.content() + body + b"\r\n.", letter)
            if data.code == "closed":
                return
            if data.code != "250":
                time.sleep(PAUSE_AFTER_REFUSAL)
        client.command("QUIT")

    def _probe_logins(self) -> None:
        while not self._stop.wait(PROBE_EVERY):
            client = self._connect(PROBER)
            if client is None:
                continue
            with client:
                asked = time.monotonic()
                try:
                    reply = client.login(self.user.name, self.user.password)
                    self._record(SmtpReply(PROBER, "LOGIN", reply, asked, time.monotonic()))
                    client.command("QUIT")
                except OSError as error:
                    self._record(SmtpReply(PROBER, "LOGIN", f"({error})", asked, time.monotonic()))

    def _call_api(self) -> None:
        with httpx.Client(base_url=self.node.base_url, timeout=30) as http:
            for call in itertools.cycle(["listSmtp", "editSmtp"]):
                if self._stop.is_set():
                    return
                body = self.owner.creds()
                if call == "editSmtp":
                    body.update(smtp_user_name=self.user.name, total_limit=self.total_limit)
                asked = time.monotonic()
                try:
                    response = http.post(f"/settings/{call}", json=body)
                    status, answer = response.status_code, response.json()
                except httpx.HTTPError as error:
                    status, answer = 0, {"error": repr(error)}
                with self._lock:
                    self.api_replies.append(ApiReply(call, status, answer, asked, time.monotonic()))
                time.sleep(self.api_pause)

    # --- what happened ----------------------------------------------------------------------------

    def replies(self, *stages: Stage) -> list[SmtpReply]:
        with self._lock:
            return [reply for reply in self.smtp_replies if reply.stage in stages]

    def acknowledged(self) -> list[SmtpReply]:
        """DATA replies that were 250: the letters the server said it had stored."""
        return [reply for reply in self.replies("DATA") if reply.queue_id is not None]

    def api(self) -> list[ApiReply]:
        with self._lock:
            return list(self.api_replies)


def marker_of(message: QueuedMessage) -> str:
    """The letter a stored message came from (its subject is the letter's marker)."""
    assert message.data is not None, message
    found = _SUBJECT.search(message.data)
    assert found is not None, message
    return found.group(1).decode()
