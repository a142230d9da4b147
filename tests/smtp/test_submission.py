"""The submission server as an SMTP client sees it (SPEC §4), with smtplib and raw sockets."""

from __future__ import annotations

import smtplib

import pytest

from poweremail.smtp import replies
from tests.smtp.helpers import (
    SmtpUser,
    add_smtp_user,
    logged_in,
    queue_id_of,
    stored_message,
    tls_context_trusting,
    usage,
)
from tests.smtp.raw import RawSMTP
from tests.support import Owner, ServerProcess

MESSAGE = b"Subject: test\r\nFrom: a@example.com\r\n\r\nHello.\r\n"


@pytest.fixture
def user(server: ServerProcess, owner: Owner) -> SmtpUser:
    return add_smtp_user(server, owner)


def _code_and_text(reply: str) -> str:
    return reply.replace("\n", " ")


# --- greeting, extensions, login ---------------------------------------------------------------


def test_ehlo_advertises_what_spec_4_lists(server: ServerProcess) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        assert client.esmtp_features["size"] == str(25 * 1024 * 1024)
        for extension in ("8bitmime", "smtputf8", "starttls", "auth", "enhancedstatuscodes", "pipelining"):
            assert extension in client.esmtp_features, extension
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}


def test_mail_before_auth_is_refused(server: ServerProcess) -> None:
    with RawSMTP(server.smtp_port) as smtp:
        smtp.command("EHLO client.example")
        assert smtp.command("MAIL FROM:<a@example.com>") == replies.AUTH_REQUIRED


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_login_and_send_with_each_mechanism(
    server: ServerProcess, owner: Owner, user: SmtpUser, mechanism: str
) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.ehlo()
        client.user, client.password = user.name, user.password
        method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, text = client.auth(mechanism, method, initial_response_ok=(mechanism == "PLAIN"))
        assert (code, text.decode()) == (235, replies.AUTH_SUCCESS[4:])
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        code, text = client.data(MESSAGE)
        assert code == 250 and text.decode().startswith("2.0.0 Ok: queued as ")
    assert usage(server, owner, user) == (1, 1)


@pytest.mark.parametrize(
    "credentials",
    [("right-name", "wrong-password"), ("smtp0000000000", "whatever"), ("", ""), ("right-name", "")],
)
def test_wrong_credentials_get_535(
    server: ServerProcess, user: SmtpUser, credentials: tuple[str, str]
) -> None:
    name, password = credentials
    name = user.name if name == "right-name" else name
    with RawSMTP(server.smtp_port) as smtp:
        assert smtp.login(name, password) == replies.AUTH_INVALID


@pytest.mark.parametrize("change", ["disable", "delete"])
def test_disabled_or_deleted_users_cannot_log_in(
    server: ServerProcess, owner: Owner, user: SmtpUser, change: str
) -> None:
    if change == "disable":
        server.post("editSmtp", owner.creds(smtp_user_name=user.name, total_limit=1000, status="Disable"))
    else:
        server.post("deleteSmtp", owner.creds(smtp_user_name=user.name))
    with RawSMTP(server.smtp_port) as smtp:
        assert smtp.login(user.name, user.password) == replies.AUTH_INVALID


def test_reset_password_stops_the_old_one(server: ServerProcess, owner: Owner, user: SmtpUser) -> None:
    new = server.post("resetSmtpPassword", owner.creds(smtp_user_name=user.name)).json()["smtp_password"]
    with RawSMTP(server.smtp_port) as smtp:
        assert smtp.login(user.name, user.password) == replies.AUTH_INVALID
    with RawSMTP(server.smtp_port) as smtp:
        assert smtp.login(user.name, new) == replies.AUTH_SUCCESS


@pytest.mark.parametrize("change", ["disable", "reset", "delete"])
def test_a_change_mid_session_stops_new_transactions(
    server: ServerProcess, owner: Owner, user: SmtpUser, change: str
) -> None:
    with RawSMTP(server.smtp_port) as smtp:
        assert smtp.login(user.name, user.password) == replies.AUTH_SUCCESS
        assert smtp.command("MAIL FROM:<a@example.com>") == replies.SENDER_OK
        assert smtp.command("RSET").startswith("250")
        if change == "disable":
            server.post("editSmtp", owner.creds(smtp_user_name=user.name, total_limit=1000, status="disable"))
        elif change == "reset":
            server.post("resetSmtpPassword", owner.creds(smtp_user_name=user.name))
        else:
            server.post("deleteSmtp", owner.creds(smtp_user_name=user.name))
        assert smtp.command("MAIL FROM:<a@example.com>") == replies.CREDENTIALS_REVOKED
        # ...and the session is no longer logged in at all.
        assert smtp.command("MAIL FROM:<a@example.com>") == replies.AUTH_REQUIRED


def test_a_change_between_rcpt_and_end_of_data_refuses_the_message(
    server: ServerProcess, owner: Owner, user: SmtpUser
) -> None:
    with RawSMTP(server.smtp_port) as smtp:
        smtp.login(user.name, user.password)
        smtp.command("MAIL FROM:<a@example.com>")
        assert smtp.command("RCPT TO:<b@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("DATA").startswith("354")
        server.post("editSmtp", owner.creds(smtp_user_name=user.name, total_limit=1000, status="Disable"))
        assert smtp.command(MESSAGE + b".") == replies.CREDENTIALS_REVOKED
    assert usage(server, owner, user) == (0, 0)


# --- TLS -----------------------------------------------------------------------------------------


def test_starttls_then_login_with_a_verified_certificate(server: ServerProcess, user: SmtpUser) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.starttls(context=tls_context_trusting(server))
        client.login(user.name, user.password)
        assert "starttls" not in client.esmtp_features
        reply = client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        assert reply == {}


def test_implicit_tls_port(server: ServerProcess, user: SmtpUser) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", server.smtps_port, timeout=10, context=tls_context_trusting(server)
    ) as client:
        client.ehlo()
        assert "starttls" not in client.esmtp_features
        assert "auth" in client.esmtp_features
        client.login(user.name, user.password)
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        code, text = client.data(MESSAGE)
    assert code == 250
    stored = stored_message(server, queue_id_of(text))
    assert stored is not None and b"with ESMTPSA" in stored.data


def test_a_command_pipelined_with_starttls_is_never_run(server: ServerProcess, user: SmtpUser) -> None:
    with RawSMTP(server.smtp_port) as smtp:
        smtp.command("EHLO client.example")
        # The injected AUTH rides in the same packet as STARTTLS (CVE-2011-0411 style).
        smtp.send(b"STARTTLS\r\nNOOP injected\r\n")
        assert smtp.reply().startswith("220")
        smtp.sock = tls_context_trusting(server).wrap_socket(smtp.sock, server_hostname="localhost")
        # Had the injected NOOP run, its 250 would be waiting here before our EHLO's answer.
        reply = smtp.command("EHLO client.example")
        assert reply.startswith("250-") and "AUTH" in reply
        assert smtp.command("NOOP").startswith("250")


# --- limits (SPEC §3) ----------------------------------------------------------------------------


def test_hourly_limit_at_its_exact_edge(server: ServerProcess, owner: Owner) -> None:
    user = add_smtp_user(server, owner, total_limit=100, hourly_limit=3)
    with logged_in(server, user) as client:
        assert client.sendmail("a@example.com", ["b1@example.com", "b2@example.com"], MESSAGE) == {}
        refused = client.sendmail("a@example.com", ["c1@example.com", "c2@example.com"], MESSAGE)
        assert list(refused) == ["c2@example.com"]
        code, text = refused["c2@example.com"]
        assert code == 451 and text.decode().startswith("4.7.1 Hourly sending limit")
        assert "sending resumes at 20" in text.decode()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@example.com", ["d@example.com"], MESSAGE)
    assert usage(server, owner, user) == (3, 3)


def test_total_limit_at_its_exact_edge(server: ServerProcess, owner: Owner) -> None:
    user = add_smtp_user(server, owner, total_limit=2, hourly_limit=100)
    with logged_in(server, user) as client:
        assert client.sendmail("a@example.com", ["b@example.com"], MESSAGE) == {}
        assert client.sendmail("a@example.com", ["c@example.com"], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@example.com", ["d@example.com"], MESSAGE)
    code, text = refused.value.recipients["d@example.com"]
    assert f"{code} {text.decode()}" == replies.TOTAL_LIMIT.format(limit=2)
    assert usage(server, owner, user) == (2, 2)


def test_lowering_the_total_below_what_was_sent_stops_sending(server: ServerProcess, owner: Owner) -> None:
    user = add_smtp_user(server, owner, total_limit=10, hourly_limit=10)
    with logged_in(server, user) as client:
        client.sendmail("a@example.com", ["b@example.com", "c@example.com"], MESSAGE)
    edited = server.post("editSmtp", owner.creds(smtp_user_name=user.name, total_limit=1))
    assert edited.status_code == 200
    with logged_in(server, user) as client, pytest.raises(smtplib.SMTPRecipientsRefused):
        client.sendmail("a@example.com", ["d@example.com"], MESSAGE)
    assert usage(server, owner, user) == (2, 2)


def test_a_message_with_more_recipients_than_the_hourly_limit_is_refused_for_good(
    server: ServerProcess, owner: Owner
) -> None:
    user = add_smtp_user(server, owner, total_limit=100, hourly_limit=2)
    with RawSMTP(server.smtp_port) as smtp:
        smtp.login(user.name, user.password)
        smtp.command("MAIL FROM:<a@example.com>")
        assert smtp.command("RCPT TO:<b@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("RCPT TO:<c@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("RCPT TO:<d@example.com>").startswith("451 4.7.1 ")


def test_at_most_100_recipients_per_message(server: ServerProcess, user: SmtpUser) -> None:
    with RawSMTP(server.smtp_port) as smtp:
        smtp.login(user.name, user.password)
        smtp.command("MAIL FROM:<a@example.com>")
        for i in range(100):
            assert smtp.command(f"RCPT TO:<r{i}@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("RCPT TO:<r100@example.com>") == replies.TOO_MANY_RECIPIENTS
        assert smtp.command("DATA").startswith("354")
        queue_id = queue_id_of(smtp.command(MESSAGE + b"."))
    stored = stored_message(server, queue_id)
    assert stored is not None
    assert stored.recipients == [f"r{i}@example.com" for i in range(100)]


# --- what is stored (SPEC §4) --------------------------------------------------------------------


def _send_raw(
    server: ServerProcess, user: SmtpUser, data: bytes, *, mail_from: str = "<a@example.com>"
) -> str:
    with RawSMTP(server.smtp_port) as smtp:
        smtp.login(user.name, user.password)
        assert smtp.command(f"MAIL FROM:{mail_from}") == replies.SENDER_OK
        assert smtp.command("RCPT TO:<b@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("DATA").startswith("354")
        smtp.send(data)
        reply = smtp.reply()
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        # Nothing else was answered: the data held exactly one message.
        assert smtp.command("NOOP").startswith("250")
        return queue_id_of(reply)


def test_the_reply_names_the_queue_id_and_headers_are_added(server: ServerProcess, user: SmtpUser) -> None:
    queue_id = _send_raw(server, user, MESSAGE + b".\r\n")
    stored = stored_message(server, queue_id)
    assert stored is not None
    assert stored.mail_from == "a@example.com" and stored.recipients == ["b@example.com"]
    received, rest = stored.data.split(b"\r\nMessage-ID: ", 1)
    assert received.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby ")
    assert f"with ESMTPA id {queue_id}\r\n\tfor <b@example.com>;".encode() in received
    assert rest.startswith(f"<{queue_id.lower()}@".encode())
    assert stored.data.endswith(MESSAGE)


def test_an_existing_message_id_is_kept(server: ServerProcess, user: SmtpUser) -> None:
    data = b"Message-Id: <mine@example.com>\r\nSubject: x\r\n\r\nbody\r\n"
    stored = stored_message(server, _send_raw(server, user, data + b".\r\n"))
    assert stored is not None
    assert stored.data.lower().count(b"message-id:") == 1
    assert b"Message-Id: <mine@example.com>" in stored.data


def test_dot_stuffing_is_undone(server: ServerProcess, user: SmtpUser) -> None:
    stored = stored_message(server, _send_raw(server, user, b"Subject: x\r\n\r\n..leading dot\r\n.\r\n"))
    assert stored is not None and stored.data.endswith(b"\r\n\r\n.leading dot\r\n")


# The payloads of the SMTP smuggling research (SEC Consult, Dec 2023; hannob/smtpsmug): each tries to
# end the data early and start a second, smuggled transaction.
SMUGGLING_ENDINGS = [b"\n.\n", b"\r.\r\n", b"\n.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\r", b"\n.\r"]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
def test_smuggled_end_of_data_does_not_end_the_message(
    server: ServerProcess, user: SmtpUser, ending: bytes
) -> None:
    smuggled = (
        b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n"
    )
    data = b"Subject: outer\r\n\r\nbefore" + ending + smuggled + b"\r\n.\r\n"
    stored = stored_message(server, _send_raw(server, user, data))
    assert stored is not None
    assert stored.recipients == ["b@example.com"]
    assert b"Subject: smuggled" in stored.data and b"MAIL FROM:<evil@example.com>" in stored.data
    body = stored.data.split(b"\r\n\r\n", 1)[1]
    # Every lone CR or LF was stored as CRLF.
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")


def test_lone_cr_and_lf_are_stored_as_crlf(server: ServerProcess, user: SmtpUser) -> None:
    stored = stored_message(server, _send_raw(server, user, b"Subject: x\n\nline1\nline2\rline3\r\n.\r\n"))
    assert stored is not None
    assert stored.data.endswith(b"Subject: x\r\n\r\nline1\r\nline2\r\nline3\r\n")


def test_null_sender_8bit_and_smtputf8_are_accepted(server: ServerProcess, user: SmtpUser) -> None:
    queue_id = _send_raw(server, user, b"Subject: x\r\n\r\nbounce\r\n.\r\n", mail_from="<>")
    stored = stored_message(server, queue_id)
    assert stored is not None and stored.mail_from == ""

    body = "Subject: caf\u00e9\r\n\r\nGr\u00fc\u00dfe \u2603\r\n".encode()
    with logged_in(server, user) as client:
        client.ehlo()
        reply = client.sendmail(
            "j\u00f6rg@example.com",
            ["\u00e9lise@exampl\u00e9.com"],
            body,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    assert reply == {}


def test_a_limit_lowered_during_the_transaction_refuses_at_the_end_of_data_with_the_new_figure(
    server: ServerProcess, owner: Owner
) -> None:
    user = add_smtp_user(server, owner, total_limit=10, hourly_limit=10)
    with RawSMTP(server.smtp_port) as smtp:
        smtp.login(user.name, user.password)
        smtp.command("MAIL FROM:<a@example.com>")
        assert smtp.command("RCPT TO:<b@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("RCPT TO:<c@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("DATA").startswith("354")
        server.post("editSmtp", owner.creds(smtp_user_name=user.name, total_limit=1))
        # The authoritative check, under the row lock, sees the new limit and says so.
        assert smtp.command(MESSAGE + b".") == replies.TOTAL_LIMIT.format(limit=1)
    assert usage(server, owner, user) == (0, 0)


# The data is read in blocks up to each ".\r\n" (protocol.SubmissionSMTP._receive_data): these are the
# places where a block reader could end early, late, or lose a dot.


@pytest.mark.parametrize(
    ("sent", "stored_body"),
    [
        # Lines ending in a full stop are prose, not the end of the data.
        (b"Subject: x\r\n\r\nEnds with a dot.\r\nAnd again.\r\n.\r\n", b"Ends with a dot.\r\nAnd again.\r\n"),
        # A dot after a bare LF or a bare CR does not start a line (no smuggling).
        (b"Subject: x\r\n\r\na\n.\r\nb\r.\r\n.\r\n", b"a\r\n.\r\nb\r\n.\r\n"),
        # A dot-stuffed line right after the header, and one that is only the stuffed dot.
        (b"Subject: x\r\n\r\n..\r\n...x.\r\n.\r\n", b".\r\n..x.\r\n"),
    ],
    ids=["full-stops", "bare-lf-cr-dots", "stuffed"],
)
def test_data_ends_only_at_a_line_that_is_a_dot(
    server: ServerProcess, user: SmtpUser, sent: bytes, stored_body: bytes
) -> None:
    stored = stored_message(server, _send_raw(server, user, sent))
    assert stored is not None and stored.data.endswith(b"\r\n\r\n" + stored_body)


def test_data_sent_an_octet_at_a_time_ends_at_its_dot(server: ServerProcess, user: SmtpUser) -> None:
    """The end ("\\r\\n.\\r\\n") split over five TCP segments, and a first line starting with a dot."""
    with RawSMTP(server.smtp_port) as smtp:
        smtp.login(user.name, user.password)
        assert smtp.command("MAIL FROM:<a@example.com>") == replies.SENDER_OK
        assert smtp.command("RCPT TO:<b@example.com>") == replies.RECIPIENT_OK
        assert smtp.command("DATA").startswith("354")
        for octet in b"..first line\r\nSubject: x\r\n\r\nbody\r\n.\r\n":
            smtp.send(bytes([octet]))
        reply = smtp.reply()
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        stored = stored_message(server, queue_id_of(reply))
    assert stored is not None and stored.data.endswith(b".first line\r\nSubject: x\r\n\r\nbody\r\n")
