"""Session limits and abuse controls (SPEC §4, issue 3 "Session limits" and "Login").

A dedicated server with small limits; each test uses its own loopback source address
(127.0.0.x) so one test's failures or connections never count against another's.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from poweremail.smtp import replies
from poweremail.smtp.protocol import MIN_DATA_RATE
from tests.smtp.helpers import SmtpUser, add_smtp_user, tls_context_trusting, usage
from tests.smtp.raw import RawSMTP
from tests.support import Owner, ServerProcess, create_owner

MAX_SIZE = 4096


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("strict")
    server = ServerProcess(
        data_dir=directory / "data",
        database_url=f"sqlite:///{directory / 'db.sqlite3'}",
        log_path=directory / "serve.log",
        extra_args=(
            "--max-message-size", str(MAX_SIZE),
            "--max-connections-per-address", "3",
            "--failed-logins-per-address", "4",
            "--failed-login-delay", "0",
            "--smtp-idle-timeout", "1.5",
            "--smtp-session-timeout", "4",
        ),
    ).start()  # fmt: skip
    yield server
    server.stop()
    # Every refusal above was an SMTP reply, not a crash.
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def strict_owner(strict: ServerProcess) -> Owner:
    return create_owner(strict.database_url)


@pytest.fixture
def user(strict: ServerProcess, strict_owner: Owner) -> SmtpUser:
    return add_smtp_user(strict, strict_owner)


def test_size_over_the_limit_is_refused_with_552_5_3_4(
    strict: ServerProcess, strict_owner: Owner, user: SmtpUser
) -> None:
    with RawSMTP(strict.smtp_port, source="127.0.0.2") as smtp:
        smtp.login(user.name, user.password)
        assert smtp.command(f"MAIL FROM:<a@example.com> SIZE={MAX_SIZE + 1}") == replies.MESSAGE_TOO_BIG
        assert smtp.command(f"MAIL FROM:<a@example.com> SIZE={MAX_SIZE}") == replies.SENDER_OK
        smtp.command("RCPT TO:<b@example.com>")
        assert smtp.command("DATA").startswith("354")
        line = b"x" * 70 + b"\r\n"
        assert smtp.command(line * (MAX_SIZE // len(line) + 1) + b".") == replies.MESSAGE_TOO_BIG
        assert smtp.command("NOOP").startswith("250")  # the session goes on
    assert usage(strict, strict_owner, user) == (0, 0)


def test_overlong_lines_are_refused(strict: ServerProcess, user: SmtpUser) -> None:
    with RawSMTP(strict.smtp_port, source="127.0.0.3") as smtp:
        smtp.login(user.name, user.password)
        assert smtp.command("NOOP " + "x" * 600).startswith("500")
        smtp.command("MAIL FROM:<a@example.com>")
        smtp.command("RCPT TO:<b@example.com>")
        assert smtp.command("DATA").startswith("354")
        assert smtp.command(b"y" * 1200 + b"\r\n.") == replies.LINE_TOO_LONG
        assert smtp.command("NOOP").startswith("250")


def test_connections_per_address_are_capped(strict: ServerProcess) -> None:
    sessions = [RawSMTP(strict.smtp_port, source="127.0.0.4") for _ in range(3)]
    try:
        assert all(s.greeting.startswith("220") for s in sessions)
        with RawSMTP(strict.smtp_port, source="127.0.0.4") as fourth:
            assert fourth.greeting == replies.TOO_MANY_CONNECTIONS
            assert fourth.is_closed()
        with RawSMTP(strict.smtp_port, source="127.0.0.5") as elsewhere:
            assert elsewhere.greeting.startswith("220")
        sessions.pop().close()
        time.sleep(0.2)
        sessions.append(RawSMTP(strict.smtp_port, source="127.0.0.4"))
        assert sessions[-1].greeting.startswith("220")
    finally:
        for session in sessions:
            session.close()


def test_failed_logins_close_the_session_then_block_the_address_only(
    strict: ServerProcess, user: SmtpUser
) -> None:
    with RawSMTP(strict.smtp_port, source="127.0.0.6") as smtp:
        assert smtp.login(user.name, "wrong1") == replies.AUTH_INVALID
        assert smtp.command(f"AUTH PLAIN {_plain(user.name, 'wrong2')}") == replies.AUTH_INVALID
        assert smtp.command(f"AUTH PLAIN {_plain(user.name, 'wrong3')}") == replies.AUTH_TOO_MANY_IN_SESSION
        assert smtp.is_closed()
    with RawSMTP(strict.smtp_port, source="127.0.0.6") as smtp:
        assert smtp.login(user.name, "wrong4") == replies.AUTH_INVALID  # the 4th in the window
    with RawSMTP(strict.smtp_port, source="127.0.0.6") as smtp:
        # Blocked now, even with the right password: guessing from here has stopped.
        assert smtp.login(user.name, user.password) == replies.AUTH_THROTTLED
    with RawSMTP(strict.smtp_port, source="127.0.0.7") as smtp:
        # The rightful user, from its own address, is not locked out.
        assert smtp.login(user.name, user.password) == replies.AUTH_SUCCESS


def test_idle_sessions_are_closed(strict: ServerProcess) -> None:
    with RawSMTP(strict.smtp_port, source="127.0.0.8") as smtp:
        smtp.sock.settimeout(5)
        started = time.monotonic()
        assert smtp.is_closed()
        assert 1.0 < time.monotonic() - started < 4.5


def _start_data(smtp: RawSMTP, user: SmtpUser) -> None:
    smtp.login(user.name, user.password)
    smtp.command("MAIL FROM:<a@example.com>")
    smtp.command("RCPT TO:<b@example.com>")
    assert smtp.command("DATA").startswith("354")


def test_data_arriving_slowly_is_not_cut_by_the_idle_timeout(strict: ServerProcess, user: SmtpUser) -> None:
    """A message that takes longer than the idle timeout (1.5 s here) to arrive, a piece at a time
    at 1,200 octets a second, is taken (a 25 MiB message on a slow link takes minutes)."""
    with RawSMTP(strict.smtp_port, source="127.0.0.11") as smtp:
        _start_data(smtp, user)
        smtp.send(b"Subject: slow\r\n\r\n")
        for piece in range(6):  # 3 s in all, 0.5 s apart
            time.sleep(0.5)
            smtp.send(b"%d" % piece + b"x" * 596 + b"\r\n")
        assert 6 * 600 < MAX_SIZE and 600 / 0.5 > MIN_DATA_RATE
        assert smtp.command(b".").startswith("250 2.0.0 Ok: queued as ")


@pytest.mark.parametrize("trickle", [False, True], ids=["stopped", "5-octets-a-second"])
def test_data_that_stops_or_trickles_is_cut_by_the_idle_timeout(
    strict: ServerProcess, user: SmtpUser, trickle: bool
) -> None:
    """Data that stops arriving, or arrives slower than MIN_DATA_RATE (a slowloris keeping the
    connection open a few octets at a time), is cut: here within three idle periods."""
    with RawSMTP(strict.smtp_port, source="127.0.0.12") as smtp:
        _start_data(smtp, user)
        smtp.send(b"Subject: stalled\r\n\r\nfirst line\r\n")
        started = time.monotonic()
        if trickle:
            with contextlib.suppress(OSError):
                for octet in itertools.cycle(b"slow\r\n"):
                    time.sleep(0.2)  # 5 octets a second
                    smtp.send(bytes([octet]))
                    if time.monotonic() - started > 6:
                        break
        smtp.sock.settimeout(5)
        assert smtp.is_closed()
        assert 1.0 < time.monotonic() - started < 4.5


def test_overlong_sessions_are_closed_with_421(strict: ServerProcess) -> None:
    with RawSMTP(strict.smtp_port, source="127.0.0.9") as smtp:
        deadline = time.monotonic() + 8
        reply = ""
        while time.monotonic() < deadline:
            reply = smtp.command("NOOP")
            if not reply.startswith("250"):
                break
            time.sleep(0.5)
        assert reply == replies.SESSION_TOO_LONG
        assert smtp.is_closed()


def test_junk_commands_per_session_are_capped(strict: ServerProcess) -> None:
    with RawSMTP(strict.smtp_port, source="127.0.0.10") as smtp:
        smtp.send(b"NOOP\r\n" * 100)
        assert all(smtp.reply().startswith("250") for _ in range(100))
        assert smtp.command("NOOP").startswith("421 4.7.0")
        assert smtp.is_closed()


def _plain(name: str, password: str) -> str:
    return base64.b64encode(f"\0{name}\0{password}".encode()).decode()


# --- TLS before AUTH, and a configured certificate ----------------------------------------------


def test_auth_needs_tls_when_loopback_is_not_exempt(tmp_path: Path) -> None:
    server = ServerProcess(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        log_path=tmp_path / "serve.log",
        extra_args=("--plaintext-auth-on-loopback", "false"),
    ).start()
    try:
        user = add_smtp_user(server, create_owner(server.database_url))
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
            client.ehlo()
            assert "auth" not in client.esmtp_features
            code, text = client.docmd("AUTH", f"PLAIN {_plain(user.name, user.password)}")
            assert f"{code} {text.decode()}" == replies.ENCRYPTION_REQUIRED
            client.starttls(context=tls_context_trusting(server))
            client.ehlo()
            assert "auth" in client.esmtp_features
            client.login(user.name, user.password)
    finally:
        server.stop()


def test_a_configured_certificate_is_served(tmp_path: Path) -> None:
    authority = trustme.CA()
    issued = authority.issue_cert("mail.example.test", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    server = ServerProcess(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        log_path=tmp_path / "serve.log",
        extra_args=("--tls-cert", str(cert), "--tls-key", str(key)),
    ).start()
    try:
        context = ssl.create_default_context()
        authority.configure_trust(context)
        # Verified against the CA that issued it (the certificate names 127.0.0.1 too).
        with smtplib.SMTP_SSL("127.0.0.1", server.smtps_port, timeout=10, context=context) as client:
            assert client.noop()[0] == 250
            peer = client.sock.getpeercert()
            assert ("DNS", "mail.example.test") in peer["subjectAltName"]
        assert not (tmp_path / "data" / "tls").exists()  # nothing generated when one is configured
    finally:
        server.stop()
