"""Delivery through a relay (--relay): real receiving SMTP servers on loopback."""

from __future__ import annotations

import email
import email.policy
import time
from email.message import EmailMessage

import pytest
import trustme

from tests.delivery.conftest import StartNode
from tests.delivery.helpers import all_in, bounce_reports, send, smtp_user, wait_for_states
from tests.delivery.receiver import Receiver, server_tls_context
from tests.support import Owner, ServerProcess, create_owner

LETTER = (
    "From: app@sender.test\r\n"
    "To: team@example.test\r\n"
    "Subject: quarterly report\r\n"
    "\r\n"
    "Hello team,\r\n"
    ".a line that starts with a dot\r\n"
    "..and one with two\r\n"
    ".\r\n"  # a line with a lone dot: must not end the message on the way out
    "The end.\r\n"
)


def _body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def _report(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_three_recipients_arrive_once_each_with_the_body_intact(
    start_node: StartNode, sender: Owner, pipelining: bool
) -> None:
    with Receiver(data=lambda n: f"250 2.0.0 queued as R{n}", pipelining=pipelining) as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none")
        user = smtp_user(node, sender)
        rcpts = ["ann@example.test", "bob@example.test", "cy@other.test"]
        queue_id = send(node, user, "app@sender.test", rcpts, LETTER)
        wait_for_states(node, queue_id, all_in("delivered"), "all delivered")
        [message] = relay.wait_for_messages(1)
        time.sleep(0.3)  # nothing more arrives
        assert len(relay.messages) == 1
        # Through a relay, a message's recipients all go in one transaction, whatever their domains.
        assert message.rcpt_tos == rcpts
        assert message.mail_from == "app@sender.test"
        assert _body(message.data) == _body(LETTER.encode())
        assert f"id {queue_id}".encode() in message.data  # our Received header went along
        states = wait_for_states(node, queue_id, all_in("delivered"), "recorded")
        assert [(s.attempts, s.last_reply) for s in states] == [(1, "250 2.0.0 queued as R1")] * 3


def test_lone_line_feeds_leave_as_crlf(start_node: StartNode, sender: Owner) -> None:
    with Receiver() as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none")
        user = smtp_user(node, sender)
        queue_id = send(
            node, user, "app@sender.test", ["ann@example.test"], b"Subject: x\n\nline one\nline two\r\n"
        )
        wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        [message] = relay.wait_for_messages(1)
        assert _body(message.data) == b"line one\r\nline two\r\n"
        assert message.data.count(b"\n") == message.data.count(b"\r\n")


def test_a_temporary_refusal_is_retried_until_delivered(start_node: StartNode, sender: Owner) -> None:
    def rcpt(address: str, n: int) -> str | None:
        return "451 4.3.0 try again later" if n <= 2 else None

    with Receiver(rcpt=rcpt) as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none", "--retry-delays", "0.5,0.5")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        [deferred] = wait_for_states(node, queue_id, all_in("deferred"), "deferred after the first 451")
        assert deferred.attempts == 1
        assert deferred.last_reply == "451 4.3.0 try again later"
        [delivered] = wait_for_states(node, queue_id, all_in("delivered"), "delivered on the third attempt")
        assert delivered.attempts == 3
        assert relay.rcpt_attempts == {"ann@example.test": 3}
        assert len(relay.messages) == 1
        assert bounce_reports(node) == []


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_a_refused_sender_bounces_every_recipient(
    start_node: StartNode, sender: Owner, pipelining: bool
) -> None:
    def mail(address: str, n: int) -> str | None:
        return "553 5.7.1 <app@sender.test>: sender not allowed" if address == "app@sender.test" else None

    with Receiver(mail=mail, pipelining=pipelining) as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test", "bob@example.test"], LETTER)
        states = wait_for_states(node, queue_id, all_in("bounced"), "both bounced at MAIL")
        assert [(s.state, s.attempts, s.last_reply) for s in states] == [
            ("bounced", 1, "553 5.7.1 <app@sender.test>: sender not allowed")
        ] * 2
        [report] = relay.wait_for_messages(1)  # the original never got past MAIL; the report did
        assert (report.mail_from, report.rcpt_tos) == ("", ["app@sender.test"])


def test_a_recipient_answered_251_is_delivered(start_node: StartNode, sender: Owner) -> None:
    # RFC 5321 §3.4: 251 "User not local; will forward" accepts the recipient.
    with Receiver(rcpt=lambda address, n: "251 2.1.5 user not local; will forward") as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ['"ann smith"@example.test'], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        [message] = relay.wait_for_messages(1)
        assert message.rcpt_tos == ['"ann smith"@example.test']  # the quoted local part as it came in
        assert state.attempts == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_a_permanent_refusal_bounces_at_once_and_the_sender_gets_a_report(
    start_node: StartNode, sender: Owner, pipelining: bool
) -> None:
    def rcpt(address: str, n: int) -> str | None:
        return "550 5.1.1 <nobody@example.test>: no such user" if address.startswith("nobody") else None

    with Receiver(rcpt=rcpt, pipelining=pipelining) as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test", "nobody@example.test"], LETTER)
        states = wait_for_states(node, queue_id, all_in("delivered", "bounced"), "settled")
        assert [(s.state, s.attempts) for s in states] == [("delivered", 1), ("bounced", 1)]
        assert states[1].last_reply == "550 5.1.1 <nobody@example.test>: no such user"
        original, report = relay.wait_for_messages(2)
        assert original.rcpt_tos == ["ann@example.test"]
        assert report.mail_from == ""  # from the null sender
        assert report.rcpt_tos == ["app@sender.test"]
        parsed = _report(report.data)
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "delivery-status"
        status = report.data.decode()
        assert "Final-Recipient: rfc822; nobody@example.test" in status
        assert "Action: failed" in status
        assert "Status: 5.1.1" in status
        assert "Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.test>: no such user" in status
        assert f"X-PowerEmail-Queue-ID: {queue_id}" in status
        assert (
            "ann@example.test"
            not in status.split("Content-Type: text/rfc822-headers")[0].split("message/delivery-status")[1]
        )  # only the failed recipient is reported
        time.sleep(0.3)
        assert len(relay.messages) == 2  # one report, not one per attempt or per recipient


def test_expiry_bounces_with_delivery_time_expired(start_node: StartNode, sender: Owner) -> None:
    with Receiver(
        rcpt=lambda address, n: "451 4.2.1 mailbox busy" if address.startswith("ann") else None
    ) as relay:
        node = start_node(
            "--relay",
            relay.address,
            "--relay-tls",
            "none",
            "--retry-delays",
            "0.3",
            "--max-message-age",
            "1.5",
        )
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("bounced"), "bounced at the maximum age")
        assert state.attempts >= 3
        assert state.last_reply is not None and state.last_reply.endswith("451 4.2.1 mailbox busy")
        [report] = relay.wait_for_messages(1)
        assert report.rcpt_tos == ["app@sender.test"]
        text = report.data.decode()
        assert "Final-Recipient: rfc822; ann@example.test" in text
        assert "Action: failed" in text
        assert "Status: 4.4.7" in text  # RFC 3463: delivery time expired


def test_no_bounce_for_the_null_sender(start_node: StartNode, sender: Owner) -> None:
    with Receiver(rcpt=lambda address, n: "550 5.1.1 no such user") as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "", ["nobody@example.test"], LETTER)
        wait_for_states(node, queue_id, all_in("bounced"), "bounced")
        time.sleep(0.5)  # a report would have been queued with the outcome and sent by now
        assert bounce_reports(node) == []
        assert relay.messages == []
        assert relay.rcpt_attempts == {"nobody@example.test": 1}


def test_a_bounce_that_bounces_makes_no_further_report(start_node: StartNode, sender: Owner) -> None:
    with Receiver(rcpt=lambda address, n: "550 5.1.1 no such user") as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["nobody@example.test"], LETTER)
        wait_for_states(node, queue_id, all_in("bounced"), "bounced")
        [(report_id, _)] = bounce_reports(node)
        wait_for_states(node, report_id, all_in("bounced"), "the report bounced too")
        time.sleep(0.5)
        assert len(bounce_reports(node)) == 1
        assert relay.rcpt_attempts == {"nobody@example.test": 1, "app@sender.test": 1}


def test_smtputf8_toward_a_server_without_it_bounces_with_a_reason(
    start_node: StartNode, sender: Owner
) -> None:
    with Receiver(smtputf8=False) as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["jörg@example.test"], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("bounced"), "bounced")
        assert state.last_reply is not None and "SMTPUTF8" in state.last_reply
        [report] = relay.wait_for_messages(1)  # the report itself is plain ASCII: it goes
        assert "Status: 5.6.7" in report.data.decode()
        assert relay.rcpt_attempts == {"app@sender.test": 1}  # the UTF-8 address was never sent


def test_messages_to_one_destination_reuse_one_connection(start_node: StartNode, sender: Owner) -> None:
    with Receiver() as relay:
        node = start_node(
            "--relay", relay.address, "--relay-tls", "none", "--max-connections-per-destination", "1"
        )
        user = smtp_user(node, sender)
        for index in range(6):
            send(node, user, "app@sender.test", [f"r{index}@example.test"], LETTER)
        received = relay.wait_for_messages(6)
        assert {message.connection_id for message in received} == {1}
        assert relay.connections == 1


def test_connections_per_destination_are_capped(start_node: StartNode, sender: Owner) -> None:
    with Receiver(data=lambda n: time.sleep(0.2)) as relay:  # type: ignore[func-returns-value]
        node = start_node(
            "--relay", relay.address, "--relay-tls", "none", "--max-connections-per-destination", "2"
        )
        user = smtp_user(node, sender)
        for index in range(10):
            send(node, user, "app@sender.test", [f"r{index}@example.test"], LETTER)
        relay.wait_for_messages(10)
        assert relay.connections == 2


def test_starttls_and_login_at_the_relay(start_node: StartNode, sender: Owner, tmp_path: object) -> None:
    ca = trustme.CA()
    ca_file = f"{tmp_path}/relay-ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    with Receiver(starttls_context=server_tls_context(ca), auth=("relayuser", "relay-secret")) as relay:
        node = start_node(
            "--relay", f"localhost:{relay.port}",
            "--relay-tls", "starttls",
            "--relay-ca-file", ca_file,
            "--relay-user", "relayuser",
            "--relay-password", "relay-secret",
        )  # fmt: skip
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        [message] = relay.wait_for_messages(1)
        assert message.tls
        assert message.auth_user == "relayuser"
        assert "relay-secret" not in node.log()


def test_an_untrusted_relay_certificate_defers(start_node: StartNode, sender: Owner) -> None:
    with Receiver(starttls_context=server_tls_context(trustme.CA())) as relay:
        node = start_node("--relay", f"localhost:{relay.port}", "--relay-tls", "starttls")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("deferred"), "deferred")
        assert state.last_reply is not None and "certificate" in state.last_reply.lower()
        assert relay.messages == []


def test_a_wrong_relay_password_defers_and_never_bounces(start_node: StartNode, sender: Owner) -> None:
    with Receiver(auth=("relayuser", "relay-secret")) as relay:
        node = start_node(
            "--relay", relay.address, "--relay-tls", "none",
            "--relay-user", "relayuser", "--relay-password", "wrong",
        )  # fmt: skip
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        [state] = wait_for_states(node, queue_id, lambda s: s[0].attempts >= 2, "retried")
        assert state.state == "deferred"
        assert state.last_reply is not None and "login" in state.last_reply
        assert bounce_reports(node) == []


def test_a_relay_that_is_down_defers(start_node: StartNode, sender: Owner) -> None:
    relay = Receiver().start()
    address = relay.address
    relay.stop()  # nothing listens there now: connection refused
    node = start_node("--relay", address, "--relay-tls", "none")
    user = smtp_user(node, sender)
    queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
    [state] = wait_for_states(node, queue_id, all_in("deferred"), "deferred")
    assert state.last_reply is not None and "refused" in state.last_reply.lower()


def test_list_messages_follows_the_states_as_they_change(start_node: StartNode, sender: Owner) -> None:
    def rcpt(address: str, n: int) -> str | None:
        if address.startswith("nobody"):
            return "550 5.1.1 no such user"
        return "451 4.3.0 try again later" if n == 1 else None

    def listed(node: ServerProcess, owner: Owner, user_name: str) -> list[dict[str, object]]:
        response = node.post("listMessages", owner.creds(smtp_user_name=user_name))
        assert response.status_code == 200, response.text
        [message] = response.json()["messages"]
        recipients: list[dict[str, object]] = message["recipients"]
        return recipients

    with Receiver(rcpt=rcpt) as relay:
        node = start_node("--relay", relay.address, "--relay-tls", "none", "--retry-delays", "1")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test", "nobody@example.test"], LETTER)
        wait_for_states(node, queue_id, lambda s: s[0].state == "deferred", "ann deferred")
        ann, nobody = listed(node, sender, user.name)
        assert (ann["state"], ann["attempts"], ann["last_reply"]) == (
            "deferred",
            1,
            "451 4.3.0 try again later",
        )
        assert ann["next_attempt_at"] is not None
        assert (nobody["state"], nobody["attempts"]) == ("bounced", 1)
        assert nobody["last_reply"] == "550 5.1.1 no such user" and nobody["next_attempt_at"] is None
        wait_for_states(node, queue_id, all_in("delivered", "bounced"), "ann delivered")
        ann, _ = listed(node, sender, user.name)
        assert (ann["state"], ann["attempts"], ann["next_attempt_at"]) == ("delivered", 2, None)
        # Another owner cannot read this user's messages: the same answer as for no such user.
        stranger = create_owner(node.database_url)
        refused = node.post("listMessages", stranger.creds(smtp_user_name=user.name))
        missing = node.post("listMessages", stranger.creds(smtp_user_name="smtp1"))
        assert refused.status_code == missing.status_code == 400
        assert refused.json()["message"].replace(user.name, "X") == missing.json()["message"].replace(
            "smtp1", "X"
        )


def test_implicit_tls_to_the_relay(start_node: StartNode, sender: Owner, tmp_path: object) -> None:
    ca = trustme.CA()
    ca_file = f"{tmp_path}/relay-ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    with Receiver(implicit_tls_context=server_tls_context(ca)) as relay:
        node = start_node(
            "--relay", f"localhost:{relay.port}", "--relay-tls", "tls", "--relay-ca-file", ca_file
        )
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        [message] = relay.wait_for_messages(1)
        assert message.tls


def test_implicit_tls_to_an_untrusted_relay_defers_with_the_reason(
    start_node: StartNode, sender: Owner
) -> None:
    with Receiver(implicit_tls_context=server_tls_context(trustme.CA())) as relay:
        node = start_node("--relay", f"localhost:{relay.port}", "--relay-tls", "tls")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("deferred"), "deferred")
        assert state.last_reply is not None and "certificate" in state.last_reply.lower(), state.last_reply
        assert relay.messages == []
