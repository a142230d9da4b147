"""Hostile SMTP input against a real ``poweremail serve`` (issue 6, item 4), on SQLite and PostgreSQL.

Hypothesis plays generated sessions and checks each reply against a model (tests/smtp/hostile.py);
fixed cases cover the smuggling endings of hannob/smtpsmug not already in test_submission.py,
unbounded lines, endless NOOPs, a thousand RCPTs, the size and line limits at their edges, NUL
bytes, commands pipelined before STARTTLS, and the defects this work found. The server gets a small
``--max-message-size`` so generated payloads cross it; its log must end without a traceback.
``reliability/hostile_smtp.py`` runs the same model over many more examples.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from poweremail.smtp import replies
from tests.conftest import _new_database_url
from tests.smtp.helpers import SmtpUser, add_smtp_user, tls_context_trusting
from tests.smtp.hostile import (
    Auth,
    Command,
    Example,
    ModelViolation,
    SessionPlan,
    Stats,
    Target,
    examples,
    run_example,
    send_normally,
    stored_for,
)
from tests.smtp.raw import RawSMTP
from tests.smtp.test_submission import SMUGGLING_ENDINGS
from tests.support import Owner, ServerProcess, create_owner, drop_postgres_database, run

MAX_SIZE = 8192
EXAMPLES = 100  # per backend; reliability/hostile_smtp.py runs thousands
MIB = 1024 * 1024
MEMORY_BOUND = 50 * MIB  # growth of the server's resident memory while one hostile client works
GENERATED: dict[str, Stats] = {}  # per backend, over all generated examples


@pytest.fixture(scope="module")
def hostile(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp(f"hostile-{backend}")
    url = _new_database_url(backend, directory)
    server = ServerProcess(
        data_dir=directory / "data",
        database_url=url,
        log_path=directory / "serve.log",
        extra_args=(
            "--max-message-size", str(MAX_SIZE),
            # Logins fail here on purpose, all from 127.0.0.1; the throttles have tests of their own.
            "--failed-logins-per-address", "100000",
            "--failed-login-delay", "0",
        ),
    ).start()  # fmt: skip
    yield server
    server.stop()
    if backend == "postgresql":
        run(drop_postgres_database(url))
    # Whatever the clients sent, every refusal was an SMTP reply, never a server error.
    errors = [line for line in server.log().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not errors, "\n".join(errors[:20])
    stats = GENERATED.get(backend)
    if stats is not None and stats.examples >= EXAMPLES:
        # The generated sessions do reach the end of DATA (the strategies are not all refusals).
        print(f"{backend}: {stats}")
        assert stats.accepted >= 10, stats


@pytest.fixture(scope="module")
def target(hostile: ServerProcess) -> Target:
    return Target(
        smtp_port=hostile.smtp_port,
        smtps_port=hostile.smtps_port,
        max_size=MAX_SIZE,
        tls=tls_context_trusting(hostile),
        database_url=hostile.database_url,
    )


@pytest.fixture(scope="module")
def hostile_owner(hostile: ServerProcess) -> Owner:
    return create_owner(hostile.database_url)


@pytest.fixture(scope="module")
def canary(hostile: ServerProcess, hostile_owner: Owner) -> SmtpUser:
    """Sends one normal message after every example: the server still works."""
    return add_smtp_user(hostile, hostile_owner, total_limit=2_000_000_000, hourly_limit=2_000_000_000)


@pytest.fixture
def user(hostile: ServerProcess, hostile_owner: Owner) -> SmtpUser:
    return add_smtp_user(hostile, hostile_owner)


# --- generated sessions ---------------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the working tree
    derandomize=True,  # CI sees the same examples every run; the long run draws new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(example=examples())
def test_generated_sessions_get_only_the_answers_the_model_allows(
    backend: str,
    hostile: ServerProcess,
    target: Target,
    hostile_owner: Owner,
    canary: SmtpUser,
    example: Example,
) -> None:
    user = add_smtp_user(
        hostile, hostile_owner, total_limit=example.total_limit, hourly_limit=example.hourly_limit
    )
    run_example(target, example, user, GENERATED.setdefault(backend, Stats()))
    assert hostile.process is not None and hostile.process.poll() is None, "the server died"
    send_normally(target, canary, timeout=15)


def test_the_model_refuses_a_wrong_answer(target: Target, user: SmtpUser) -> None:
    """The checker itself: a model that expects the wrong limit must fail on the server's answer."""
    plan = SessionPlan(
        implicit_tls=False,
        steps=(
            Command(b"EHLO client.example"),
            Auth("PLAIN", True, "right", "right"),
            Command(b"MAIL FROM:<a@example.com>"),
            Command(b"RCPT TO:<b@example.com>"),
            Command(b"RCPT TO:<c@example.com>"),
        ),
    )
    with pytest.raises(ModelViolation, match="RCPT"):
        # The user may send 1000; the model is told 1.
        run_example(target, Example(total_limit=1, hourly_limit=1000, sessions=(plan,)), user, Stats())


# --- SMTP smuggling (SEC Consult 2023; the payloads of hannob/smtpsmug) ------------------------------

SMTPSMUG_ENDINGS = [
    b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",  # nullbefore, and nullafter as its name means it
]  # fmt: skip
NOT_YET_COVERED = [ending for ending in SMTPSMUG_ENDINGS if ending not in SMUGGLING_ENDINGS]
SMUGGLED = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n"


def test_every_smtpsmug_ending_is_tested() -> None:
    assert set(SMUGGLING_ENDINGS) | set(NOT_YET_COVERED) == set(SMTPSMUG_ENDINGS)
    assert NOT_YET_COVERED == [b"\r.\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


def _login(smtp: RawSMTP, user: SmtpUser) -> None:
    assert smtp.login(user.name, user.password) == replies.AUTH_SUCCESS


@pytest.mark.parametrize("ending", NOT_YET_COVERED, ids=repr)
def test_a_smuggled_end_of_data_is_data_and_makes_no_second_message(
    target: Target, user: SmtpUser, ending: bytes
) -> None:
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        smtp.command("MAIL FROM:<a@example.com>")
        assert smtp.command("RCPT TO:<b@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("DATA").startswith("354")
        smtp.send(b"Subject: outer\r\n\r\nbefore" + ending + SMUGGLED + b"after\r\n.\r\n")
        assert smtp.reply().startswith("250 2.0.0 Ok: queued as ")
        assert smtp.command("NOOP") == "250 OK"  # the next reply is NOOP's: nothing else was run
    [stored], sent_total = stored_for(target.database_url, user.name)
    assert (stored.recipients, sent_total) == (["b@example.com"], 1)
    assert b"before" in stored.data and b"Subject: smuggled\r\nafter\r\n" in stored.data
    body = stored.data.split(b"\r\n\r\n", 1)[1]
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")


def test_pipelined_messages_stay_apart(target: Target, user: SmtpUser) -> None:
    """smtpsmug's "pipelining" check: a real end of data, then a whole transaction in the same write.
    PIPELINING is advertised, so both are taken, each with its own content."""
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        smtp.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
            b"Subject: one\r\n\r\nfirst\r\n.\r\n"
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
            b"Subject: two\r\n\r\nsecond\r\n.\r\n"
        )
        answers = [smtp.reply() for _ in range(8)]
    assert [a[:3] for a in answers] == ["250", "250", "354", "250", "250", "250", "354", "250"]
    stored, _ = stored_for(target.database_url, user.name)
    assert [(m.recipients, m.data.endswith(b"\r\n\r\nfirst\r\n")) for m in stored[:1]] == [
        (["b@example.com"], True)
    ]
    assert [(m.recipients, m.data.endswith(b"\r\n\r\nsecond\r\n")) for m in stored[1:]] == [
        (["c@example.com"], True)
    ]


def test_commands_pipelined_before_starttls_are_not_run(target: Target, user: SmtpUser) -> None:
    token = base64.b64encode(f"\0{user.name}\0{user.password}".encode())
    injected = (
        b"AUTH PLAIN " + token + b"\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n"
        b"DATA\r\nSubject: injected\r\n\r\n.\r\n"
    )
    with RawSMTP(target.smtp_port) as smtp:
        smtp.command("EHLO client.example")
        smtp.send(b"STARTTLS\r\n" + injected)
        assert smtp.reply() == "220 Ready to start TLS"
        smtp.sock = target.tls.wrap_socket(smtp.sock, server_hostname="localhost")
        # Had anything injected run, its replies would come before these.
        assert smtp.command("EHLO client.example").startswith("250-")
        assert smtp.command("MAIL FROM:<a@example.com>") == replies.AUTH_REQUIRED
    assert stored_for(target.database_url, user.name) == ([], 0)


# --- bounded memory ---------------------------------------------------------------------------------


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _peak_growth(pid: int, work: Callable[[], None]) -> int:
    """How far the process's resident memory rose above where it was, while ``work`` ran (sampled
    every 5 ms)."""
    before = _rss(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss(pid)) - before


def _server_pid(hostile: ServerProcess) -> int:
    assert hostile.process is not None
    return hostile.process.pid


@pytest.mark.parametrize(
    ("where", "size"),
    [("command", MIB), ("command", 64 * MIB), ("data", MIB)],
    ids=["command-1MiB", "command-64MiB", "data-1MiB"],
)
def test_a_line_without_end_is_read_in_bounded_memory_then_refused(
    hostile: ServerProcess, target: Target, user: SmtpUser, where: str, size: int
) -> None:
    """A line with no newline: the server drops it as it comes (64 MiB would show if it kept it),
    answers an error when the line ends, and the session goes on."""
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        if where == "data":
            smtp.command("MAIL FROM:<a@example.com>")
            smtp.command("RCPT TO:<b@example.com>")
            assert smtp.command("DATA").startswith("354")

        def send_line() -> None:
            for _ in range(size // MIB):
                smtp.send(b"A" * MIB)
            reply = smtp.command(b"\r\n." if where == "data" else b"")
            assert reply == (replies.LINE_TOO_LONG if where == "data" else "500 Command line too long")

        growth = _peak_growth(_server_pid(hostile), send_line)
        assert smtp.command("NOOP") == "250 OK"
    print(f"{where} line of {size // MIB} MiB: server RSS +{growth / MIB:.1f} MiB at peak")
    assert growth < MEMORY_BOUND
    assert stored_for(target.database_url, user.name) == ([], 0)


def test_an_endless_line_in_data_closes_the_session(
    hostile: ServerProcess, target: Target, user: SmtpUser
) -> None:
    """aiosmtpd keeps every piece of an overlong DATA line until it ends: 64 MiB sent, 61 MiB more
    resident. Past protocol.MAX_DATA_RUN (1 MiB) without a CRLF the session is closed instead."""
    sent = 0
    answers: list[str] = []
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        smtp.command("MAIL FROM:<a@example.com>")
        smtp.command("RCPT TO:<b@example.com>")
        assert smtp.command("DATA").startswith("354")

        def send_endless_line() -> None:
            nonlocal sent
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while sent < 64 * MIB:
                    smtp.send(b"A" * MIB)
                    sent += MIB
            with contextlib.suppress(ConnectionResetError):
                answers.append(smtp.reply())

        growth = _peak_growth(_server_pid(hostile), send_endless_line)
    print(
        f"endless DATA line: closed after {sent / MIB:.0f} MiB sent;"
        f" server RSS +{growth / MIB:.1f} MiB at peak"
    )
    assert sent < 64 * MIB  # the server stopped reading and closed
    assert answers in ([replies.DATA_LINE_RUNAWAY], [""], [])  # the reply may be lost to the reset
    assert growth < MEMORY_BOUND
    assert stored_for(target.database_url, user.name) == ([], 0)
    send_normally(target, user, timeout=15)


def test_a_line_without_end_then_a_hang_up_leaves_the_server_working(target: Target, user: SmtpUser) -> None:
    with RawSMTP(target.smtp_port) as smtp:
        smtp.send(b"B" * MIB)
    assert send_normally(target, user, timeout=15)


def test_ten_thousand_noops_end_at_the_junk_command_cap(hostile: ServerProcess, target: Target) -> None:
    noop_budget = 100  # COMMAND_LIMITS["NOOP"]
    answers: list[str] = []

    def flood() -> None:
        with RawSMTP(target.smtp_port) as smtp:

            def read_replies() -> None:
                # Read while the flood is still being sent: the server closes at the cap with some
                # of it unread, so its kernel answers the rest with a reset, and Linux drops
                # whatever the client had received but not yet read (the 421 with it).
                with contextlib.suppress(ConnectionResetError):
                    while answer := smtp.reply():
                        answers.append(answer)

            reader = threading.Thread(target=read_replies)
            reader.start()
            try:
                smtp.send(b"NOOP\r\n" * 10_000)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed at the cap, while the rest was still being sent
            reader.join(timeout=30)

    growth = _peak_growth(_server_pid(hostile), flood)
    assert answers == ["250 OK"] * noop_budget + ["421 4.7.0 NOOP sent too many times"]
    assert growth < MEMORY_BOUND


def test_a_thousand_rcpts_in_one_transaction(target: Target, user: SmtpUser) -> None:
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        smtp.command("MAIL FROM:<a@example.com>")
        smtp.send(b"".join(f"RCPT TO:<r{i}@example.com>\r\n".encode() for i in range(1000)))
        answers = [smtp.reply() for _ in range(1000)]
        assert answers == [replies.RECIPIENT_OK] * 100 + [replies.TOO_MANY_RECIPIENTS] * 900
        assert smtp.command("DATA").startswith("354")
        assert smtp.command(b"Subject: many\r\n\r\nhi\r\n.").startswith("250 2.0.0 Ok: queued as ")
    [stored], sent_total = stored_for(target.database_url, user.name)
    assert stored.recipients == [f"r{i}@example.com" for i in range(100)] and sent_total == 100


# --- the limits at their edges ------------------------------------------------------------------------


def _content_of(size: int) -> bytes:
    """Headers and CRLF-ended lines of exactly ``size`` octets."""
    head = b"Subject: size\r\n\r\n"
    body_size = size - len(head)
    lines, rest = divmod(body_size, 80)
    body = (b"x" * 78 + b"\r\n") * lines
    if rest:
        assert rest >= 2
        body += b"y" * (rest - 2) + b"\r\n"
    return head + body


@pytest.mark.parametrize("over", [0, 1])
def test_data_of_exactly_the_size_limit_is_taken_and_one_octet_more_is_not(
    target: Target, user: SmtpUser, over: int
) -> None:
    content = _content_of(MAX_SIZE + over)
    assert len(content) == MAX_SIZE + over
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        assert smtp.command(f"MAIL FROM:<a@example.com> SIZE={MAX_SIZE + over}") == (
            replies.MESSAGE_TOO_BIG if over else replies.SENDER_OK
        )
        smtp.command("MAIL FROM:<a@example.com>")  # without SIZE: the data itself is measured
        smtp.command("RCPT TO:<b@example.com>")
        assert smtp.command("DATA").startswith("354")
        reply = smtp.command(content + b".")
        assert smtp.command("NOOP") == "250 OK"
    stored, _ = stored_for(target.database_url, user.name)
    if over:
        assert (reply, stored) == (replies.MESSAGE_TOO_BIG, [])
    else:
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        assert len(stored) == 1 and stored[0].data.endswith(content)


@pytest.mark.parametrize(
    ("line", "taken"),
    [
        (b"a" * 998 + b"\r\n", True),  # 1000 octets: RFC 5321 4.5.3.1.6's maximum
        (b".." + b"a" * 997 + b"\r\n", True),  # the same starting with a dot: 1001 on the wire
        # 1001 octets without a stuffing dot: taken. aiosmtpd's limit counts a possible stuffing
        # dot for every line; RFC 5321 4.5.3.1 asks receivers to take at least 1000, not to refuse more.
        (b"a" * 999 + b"\r\n", True),
        (b"a" * 1000 + b"\r\n", False),  # 1002 octets
        (b"a" * 1001 + b"\r\n", False),  # a line of 1001 octets before its CRLF
    ],
    ids=["1000", "1000-stuffed", "1001", "1002", "1003"],
)
def test_data_line_length_at_the_limit(target: Target, user: SmtpUser, line: bytes, taken: bool) -> None:
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        smtp.command("MAIL FROM:<a@example.com>")
        smtp.command("RCPT TO:<b@example.com>")
        assert smtp.command("DATA").startswith("354")
        reply = smtp.command(b"Subject: long line\r\n\r\n" + line + b".")
        assert smtp.command("NOOP") == "250 OK"
    stored, _ = stored_for(target.database_url, user.name)
    if taken:
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        unstuffed = line[1:] if line.startswith(b".") else line
        assert stored[0].data.endswith(b"\r\n\r\n" + unstuffed)
    else:
        assert (reply, stored) == (replies.LINE_TOO_LONG, [])


def test_nul_and_8bit_bytes_in_data_are_stored_as_sent(target: Target, user: SmtpUser) -> None:
    body = b"Subject: nul\r\n\r\na\x00b\r\n\x00\r\n\xff\xfe\x80 \xc3\xa9\r\n\x00.\r\n"
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        smtp.command("MAIL FROM:<a@example.com> BODY=8BITMIME")
        smtp.command("RCPT TO:<b@example.com>")
        assert smtp.command("DATA").startswith("354")
        assert smtp.command(body + b".").startswith("250 2.0.0 Ok: queued as ")
    [stored], _ = stored_for(target.database_url, user.name)
    assert stored.data.endswith(body)


# --- defects found by this work (each test fails without its fix) ---------------------------------


@pytest.mark.parametrize(
    "address",
    [
        b"<a\rb@example.com>",  # went into the Received header as a bare CR
        b'<"x\rBcc: evil@example.com"@example.com>',
        b"<a\x00b@example.com>",  # PostgreSQL: 451 and a traceback, for ever
        b"<\xff\xfe@example.com>",  # invalid UTF-8: 451 and a traceback; SQLite: the session stuck
        b"<a@" + b"d" * 300 + b".example>",  # a domain over 255: PostgreSQL refused it at DATA
        b"<" + b"l" * 243 + b"@example.com>",  # a path of 257 octets
        b"<>",  # RCPT TO:<> was queued as a recipient "<>"
        b"<postmaster>",  # no domain to deliver to
    ],
    ids=["cr", "quoted-cr", "nul", "invalid-utf8", "long-domain", "long-path", "null", "no-domain"],
)
def test_an_address_that_is_no_mailbox_is_refused_at_mail_and_rcpt(
    target: Target, user: SmtpUser, address: bytes
) -> None:
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        sender_reply = smtp.command(b"MAIL FROM:" + address)
        if address == b"<>":
            assert sender_reply == replies.SENDER_OK  # the null sender is a sender
        else:
            assert sender_reply == replies.BAD_SENDER
            assert smtp.command("MAIL FROM:<a@example.com>") == replies.SENDER_OK
        assert smtp.command(b"RCPT TO:" + address) == replies.BAD_RECIPIENT
        assert smtp.command("RCPT TO:<b@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("DATA").startswith("354")
        assert smtp.command(b"Subject: x\r\n\r\nhi\r\n.").startswith("250 2.0.0 Ok: queued as ")
    [stored], _ = stored_for(target.database_url, user.name)
    assert stored.recipients == ["b@example.com"]
    assert stored.data.count(b"\r") == stored.data.count(b"\n") == stored.data.count(b"\r\n")


@pytest.mark.parametrize("address", ["a@", '""@', "\x00@", "0@["])
def test_an_address_with_nothing_after_the_at_is_malformed_not_a_server_error(
    target: Target, user: SmtpUser, address: str
) -> None:
    """Python's address parser raises IndexError or AttributeError for these; aiosmtpd answered 451
    with a traceback."""
    malformed = "553 5.1.3 Error: malformed address"
    with RawSMTP(target.smtp_port) as smtp:
        _login(smtp, user)
        assert smtp.command(f"MAIL FROM:{address}") == malformed
        assert smtp.command("MAIL FROM:<a@example.com>") == replies.SENDER_OK
        assert smtp.command(f"RCPT TO:{address}") == malformed
        assert smtp.command(f"VRFY {address}") == f"502 Could not VRFY {address}"
        assert smtp.command("RCPT TO:<b@example.com>") == replies.RECIPIENT_OK


def test_a_login_name_with_a_nul_is_a_wrong_name(target: Target, user: SmtpUser) -> None:
    """On PostgreSQL, a NUL in an AUTH LOGIN name made the lookup fail: 454, a traceback, no count."""
    with RawSMTP(target.smtp_port) as smtp:
        smtp.command("EHLO client.example")
        name = base64.b64encode(user.name.encode() + b"\0").decode()
        assert smtp.command(f"AUTH LOGIN {name}").startswith("334 ")
        assert smtp.command(base64.b64encode(user.password.encode())) == replies.AUTH_INVALID


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_an_overlong_auth_response_gets_500_5_5_6_and_one_reply(
    target: Target, user: SmtpUser, mechanism: str
) -> None:
    """aiosmtpd let the reader's ValueError escape: 451 4.3.0 and a traceback."""
    with RawSMTP(target.smtp_port) as smtp:
        smtp.command("EHLO client.example")
        assert smtp.command(f"AUTH {mechanism}").startswith("334 ")
        smtp.send(b"QUFB" * 5000)  # longer than a line, in pieces
        assert smtp.command(b"QUFB" * 10) == replies.AUTH_LINE_TOO_LONG
        assert smtp.command("NOOP") == "250 OK"  # the rest of the line was not read as a command
        assert smtp.login(user.name, user.password).endswith(replies.AUTH_SUCCESS)


@pytest.mark.parametrize("value", ["\u00b2", "\uff11\uff12", "x"])
def test_a_size_parameter_that_is_not_ascii_digits_is_a_syntax_error(
    target: Target, user: SmtpUser, value: str
) -> None:
    """SIZE=² passed aiosmtpd's str.isdigit() and failed its int(): 451 4.3.0 and a traceback."""
    with RawSMTP(target.smtp_port) as smtp:
        smtp.command("EHLO client.example")
        # Before AUTH it is still 530, as for every MAIL.
        assert smtp.command(f"MAIL FROM:<a@example.com> SIZE={value}") == replies.AUTH_REQUIRED
        _login(smtp, user)
        reply = smtp.command(f"MAIL FROM:<a@example.com> SIZE={value}")
        assert reply.startswith("501 ")
        assert smtp.command("MAIL FROM:<a@example.com> SIZE=10") == replies.SENDER_OK


def test_a_failed_starttls_handshake_is_no_server_error(hostile: ServerProcess, target: Target) -> None:
    """It was logged as ERROR with a traceback; it is the client's failure (logged as INFO)."""
    log_before = len(hostile.log())
    for garbage in (b"not a TLS handshake\r\n" * 10, None):  # None: hang up instead
        with socket.create_connection(("127.0.0.1", target.smtp_port), timeout=10) as sock:
            assert sock.recv(1000).startswith(b"220 ")
            sock.sendall(b"STARTTLS\r\n")
            assert sock.recv(1000).startswith(b"220 Ready to start TLS")
            if garbage is not None:
                sock.sendall(garbage)
                with contextlib.suppress(ConnectionResetError):
                    while sock.recv(1000):
                        pass
    time.sleep(0.3)
    new = hostile.log()[log_before:]
    assert "Traceback" not in new and " ERROR " not in new
