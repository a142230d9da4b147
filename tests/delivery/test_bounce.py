"""The bounce report (RFC 3464 delivery status notification): every report is read back with
Python's ``email`` package and checked field by field, and its bytes checked for the wire rules
(CRLF only, no line over 998 octets)."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from poweremail.delivery.bounce import (
    MAX_DIAGNOSTIC,
    MAX_ORIGINAL_HEADERS,
    FailedRecipient,
    build_bounce,
    enhanced_status,
)

NOW = datetime(2026, 11, 23, 12, 30, 5, tzinfo=UTC)
ACCEPTED = NOW - timedelta(days=2, hours=1)
ORIGINAL = (
    b"Received: from app ([192.0.2.7])\r\n\tby mail.sender.example (PowerEmail) with ESMTPSA id Q1\r\n"
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@example.com, carol@example.org\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <m1@sender.example>\r\n"
    b"\r\n"
    b"The body, which the report must not contain.\r\n"
)
BOB = FailedRecipient(
    address="bob@example.com",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@example.com>: no such user",
    remote_mta="mx1.example.com",
    reason="The recipient's server refused it.",
    last_attempt_at=NOW - timedelta(minutes=1),
)
CAROL = FailedRecipient(
    address="carol@example.org",
    status="4.4.7",
    diagnostic="451 4.3.0 try again later",
    remote_mta="mx.example.org",
    reason="Delivery was retried for 2 days without success.",
    last_attempt_at=NOW - timedelta(minutes=5),
)


def build(**overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": "mail.sender.example",
        "original_mail_from": "alice@sender.example",
        "original_queue_id": "0123456789ABCDEF",
        "original_accepted_at": ACCEPTED,
        "original_message": ORIGINAL,
        "recipients": [BOB, CAROL],
        "now": NOW,
        "message_id": "<0123456789ABCDEF.bounce@mail.sender.example>",
    }
    arguments.update(overrides)
    report = build_bounce(**arguments)
    check_wire_format(report)
    return report


def check_wire_format(report: bytes) -> None:
    """CRLF line endings only, no line over 998 octets (RFC 5322 §2.1.1, §2.3), ending in CRLF."""
    assert report.endswith(b"\r\n")
    assert b"\n" not in report.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in report.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in report.split(b"\r\n")) <= 998


def parse(report: bytes) -> EmailMessage:
    message = email.message_from_bytes(report, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.defects == []
    return message


def parts(report: bytes) -> tuple[EmailMessage, EmailMessage, EmailMessage]:
    message = parse(report)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, headers = message.iter_parts()
    assert [part.get_content_type() for part in (text, status, headers)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    for part in (text, status, headers):
        assert isinstance(part, EmailMessage)
        assert part.defects == []
    return text, status, headers  # type: ignore[return-value]


def status_blocks(report: bytes) -> list[Message]:
    """The per-message block, then one block per recipient."""
    _, status, _ = parts(report)
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    assert all(isinstance(block, Message) for block in blocks)
    return [block for block in blocks if isinstance(block, Message)]


def fields(block: Message) -> dict[str, str]:
    items = [(name, str(value)) for name, value in block.items()]
    assert len({name.lower() for name, _ in items}) == len(items), f"a field repeated: {items}"
    return dict(items)


def text_of(report: bytes) -> str:
    text, _, _ = parts(report)
    content = text.get_content()
    assert isinstance(content, str)
    return content


def headers_part(report: bytes) -> bytes:
    _, _, headers = parts(report)
    payload = headers.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def section(report: bytes, index: int) -> bytes:
    """The raw bytes of part ``index`` (0-based), its own header lines included."""
    message = parse(report)
    boundary = message.get_boundary()
    assert boundary is not None
    return report.split(f"\r\n--{boundary}".encode())[index + 1]


def xtext_decode(value: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]{2,6})\}", lambda match: chr(int(match[1], 16)), value)


# --- the message as a whole ---


def test_top_level_headers() -> None:
    report = build()
    message = parse(report)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mail.sender.example>"
    assert b"\r\nTo: <alice@sender.example>\r\n" in report
    assert [address.addr_spec for address in message["To"].addresses] == ["alice@sender.example"]
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsedate_to_datetime(message["Date"]) == NOW
    assert message["Message-ID"] == "<0123456789ABCDEF.bounce@mail.sender.example>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    for name in ("From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version"):
        assert len(message.get_all(name) or []) == 1, name


def test_three_parts_in_order_and_seven_bit() -> None:
    report = build()
    parts(report)
    # An all-ASCII sender, recipients and replies give an all-ASCII report, every part 7bit.
    assert report.isascii()
    text, _, headers = parts(report)
    assert text.get_content_charset() == "utf-8"
    assert text["Content-Transfer-Encoding"] == "7bit"
    assert headers["Content-Transfer-Encoding"] == "7bit"


def test_dates_are_given_in_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    report = build(now=NOW.astimezone(plus_two), original_accepted_at=ACCEPTED.astimezone(plus_two))
    assert parse(report)["Date"].endswith("+0000")
    assert parsedate_to_datetime(parse(report)["Date"]) == NOW
    assert fields(status_blocks(report)[0])["Arrival-Date"].endswith("+0000")


def test_boundary_never_occurs_in_the_content(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens: Iterator[str] = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr("poweremail.delivery.bounce.secrets.token_hex", lambda _n: next(tokens))
    original = b"X-Trap: poweremail-report-" + b"a" * 32 + b"\r\n\r\nbody\r\n"
    report = build(original_message=original)
    assert parse(report).get_boundary() == "poweremail-report-" + "b" * 32
    assert headers_part(report) == b"X-Trap: poweremail-report-" + b"a" * 32 + b"\r\n"


# --- part 1: the explanation ---


def test_explanation_names_each_recipient_reason_and_reply() -> None:
    text = text_of(build())
    assert "0123456789ABCDEF" in text
    for recipient in (BOB, CAROL):
        assert f"<{recipient.address}>" in text
        assert recipient.reason in text
        assert recipient.diagnostic is not None
        assert recipient.diagnostic in " ".join(text.split())
    assert "mx1.example.com replied" in text
    assert "body, which the report must not contain" not in text


def test_explanation_without_a_reply() -> None:
    nxdomain = FailedRecipient(
        address="dave@no-such-domain.example",
        status="5.1.2",
        diagnostic=None,
        remote_mta=None,
        reason="The recipient's domain does not exist.",
        last_attempt_at=NOW,
    )
    text = text_of(build(recipients=[nxdomain]))
    assert "<dave@no-such-domain.example>" in text
    assert "The recipient's domain does not exist." in text
    assert "replied" not in text


# --- part 2: the delivery status ---


def test_per_message_fields() -> None:
    per_message = fields(status_blocks(build())[0])
    assert per_message == {
        "Reporting-MTA": "dns; mail.sender.example",
        "X-PowerEmail-Queue-ID": "0123456789ABCDEF",
        "Arrival-Date": per_message["Arrival-Date"],
    }
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ACCEPTED


def test_one_block_per_recipient_with_its_own_status() -> None:
    blocks = status_blocks(build())
    assert len(blocks) == 3
    bob, carol = fields(blocks[1]), fields(blocks[2])
    assert bob == {
        "Final-Recipient": "rfc822; bob@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.com>: no such user",
        "Last-Attempt-Date": bob["Last-Attempt-Date"],
    }
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]) == BOB.last_attempt_at
    assert carol["Final-Recipient"] == "rfc822; carol@example.org"
    assert carol["Status"] == "4.4.7"
    assert carol["Action"] == "failed"
    assert carol["Diagnostic-Code"] == "smtp; 451 4.3.0 try again later"
    assert parsedate_to_datetime(carol["Last-Attempt-Date"]) == CAROL.last_attempt_at


def test_remote_mta_and_diagnostic_only_when_known() -> None:
    nxdomain = FailedRecipient(
        address="dave@no-such-domain.example",
        status="5.1.2",
        diagnostic=None,
        remote_mta=None,
        reason="The recipient's domain does not exist.",
        last_attempt_at=NOW,
    )
    block = fields(status_blocks(build(recipients=[nxdomain]))[1])
    assert set(block) == {"Final-Recipient", "Action", "Status", "Last-Attempt-Date"}
    assert block["Status"] == "5.1.2"


def test_non_ascii_recipient_is_utf8_type_in_seven_bit_form() -> None:
    address = "jörg+tag@bücher.example"
    recipient = FailedRecipient(
        address=address,
        status="5.1.1",
        diagnostic="550 5.1.1 unknown",
        remote_mta="mx.xn--bcher-kva.example",
        reason="The recipient's server refused it.",
        last_attempt_at=NOW,
    )
    report = build(recipients=[recipient])
    assert report.isascii()  # the delivery status stays 7-bit; the text part is quoted-printable
    final = fields(status_blocks(report)[1])["Final-Recipient"]
    kind, _, encoded = final.partition("; ")
    assert kind == "utf-8"
    assert encoded == "j\\x{F6}rg\\x{2B}tag@b\\x{FC}cher.example"  # RFC 6533 utf-8-addr-xtext
    assert xtext_decode(encoded) == address
    text, _, _ = parts(report)
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert f"<{address}>" in text_of(report)


def test_non_ascii_reply_is_escaped_in_the_status_and_readable_in_the_text() -> None:
    recipient = FailedRecipient(
        address="bob@example.com",
        status="5.2.2",
        diagnostic="552 5.2.2 Postfach voll \u2013 später",
        remote_mta="mx1.example.com",
        reason="The recipient's mailbox is full.",
        last_attempt_at=NOW,
    )
    report = build(recipients=[recipient])
    diagnostic = fields(status_blocks(report)[1])["Diagnostic-Code"]
    assert diagnostic == "smtp; 552 5.2.2 Postfach voll \\x{2013} sp\\x{E4}ter"
    assert "552 5.2.2 Postfach voll \u2013 später" in text_of(report)


def test_reply_with_line_breaks_cannot_add_fields() -> None:
    evil = FailedRecipient(
        address="bob@example.com",
        status="5.0.0",
        diagnostic=(
            "550 no\r\nStatus: 2.0.0\r\nAction: delivered\nX-Injected: 1\rFinal-Recipient: rfc822; x@y"
        ),
        remote_mta="mx1.example.com\r\nX-Host-Injected: 1",
        reason="The recipient's server refused it.\r\nX-Reason-Injected: 1",
        last_attempt_at=NOW,
    )
    report = build(recipients=[evil])
    blocks = status_blocks(report)
    assert len(blocks) == 2
    block = fields(blocks[1])
    assert set(block) == {
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    }
    assert block["Status"] == "5.0.0"
    assert block["Action"] == "failed"
    assert block["Final-Recipient"] == "rfc822; bob@example.com"
    assert block["Diagnostic-Code"] == (
        "smtp; 550 no Status: 2.0.0 Action: delivered X-Injected: 1 Final-Recipient: rfc822; x@y"
    )
    assert "\r" not in block["Remote-MTA"] and "\n" not in block["Remote-MTA"]
    # Nor lines in the readable part that start like fields, nor top-level headers.
    for line in text_of(report).splitlines():
        assert not re.match(r"(Status|Action|X-\w+-Injected|Final-Recipient):", line), line
    message = parse(report)
    assert not [name for name in message.keys() if "Injected" in name]


def test_long_reply_is_folded_and_unfolds_to_itself() -> None:
    reply = "550-5.7.1 " + " ".join(f"word{i}" for i in range(120))
    recipient = FailedRecipient(
        address="bob@example.com",
        status="5.7.1",
        diagnostic=reply,
        remote_mta="mx1.example.com",
        reason="The recipient's server refused it.",
        last_attempt_at=NOW,
    )
    report = build(recipients=[recipient])
    assert fields(status_blocks(report)[1])["Diagnostic-Code"] == f"smtp; {reply}"
    status_lines = section(report, 1).split(b"\r\n")
    assert max(len(line) for line in status_lines) <= 78
    assert sum(line.startswith(b" ") for line in status_lines) >= 5  # folded, RFC 5322 §2.2.3


def test_huge_reply_is_cut() -> None:
    reply = "550 5.7.1 " + "spam " * 5000 + "x" * 5000
    recipient = FailedRecipient(
        address="bob@example.com",
        status="5.7.1",
        diagnostic=reply,
        remote_mta="mx1.example.com",
        reason="The recipient's server refused it.",
        last_attempt_at=NOW,
    )
    report = build(recipients=[recipient])
    diagnostic = fields(status_blocks(report)[1])["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 spam spam")
    assert diagnostic.endswith(" ...")
    assert len(diagnostic) <= len("smtp; ") + MAX_DIAGNOSTIC
    assert len(report) < 10_000


def test_unbroken_reply_still_keeps_lines_short() -> None:
    reply = "550 " + "x" * 3000  # nothing to fold at: cut, then split below 998 octets
    recipient = FailedRecipient(
        address="bob@example.com",
        status="5.0.0",
        diagnostic=reply,
        remote_mta=None,
        reason="The recipient's server refused it.",
        last_attempt_at=NOW,
    )
    report = build(recipients=[recipient])  # build() checks the 998-octet limit
    assert fields(status_blocks(report)[1])["Diagnostic-Code"].startswith("smtp; 550 xxx")


# --- part 3: the original headers ---


def test_original_header_block_only() -> None:
    assert headers_part(build()) == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


def test_message_without_separator_is_all_headers() -> None:
    original = b"From: alice@sender.example\r\nSubject: no body"
    assert headers_part(build(original_message=original)) == original + b"\r\n"


def test_message_starting_with_empty_line_has_no_headers() -> None:
    assert headers_part(build(original_message=b"\r\nonly a body\r\n")) == b""


def test_bare_line_feeds_in_the_original_become_crlf() -> None:
    original = b"From: alice@sender.example\nSubject: lf\n\nbody\n"
    assert headers_part(build(original_message=original)) == (
        b"From: alice@sender.example\r\nSubject: lf\r\n"
    )


def test_huge_header_block_is_capped_at_a_line_end() -> None:
    line = b"X-Filler: " + b"f" * 88 + b"\r\n"  # 100 octets
    original = line * 5000 + b"\r\nbody\r\n"  # 500 KB of headers
    report = build(original_message=original)
    headers = headers_part(report)
    assert len(headers) <= MAX_ORIGINAL_HEADERS
    assert len(headers) > MAX_ORIGINAL_HEADERS - len(line)
    assert headers == line * (len(headers) // len(line))
    assert "cut short" in text_of(report)
    assert len(report) < MAX_ORIGINAL_HEADERS + 10_000


def test_huge_message_without_separator_is_capped() -> None:
    original = b"Subject: " + b"s" * (3 * MAX_ORIGINAL_HEADERS)  # one enormous line, no body
    report = build(original_message=original)
    _, _, part = parts(report)
    assert part["Content-Transfer-Encoding"] == "quoted-printable"  # a line over 998 octets
    headers = headers_part(report)
    assert len(headers) <= MAX_ORIGINAL_HEADERS
    assert headers.endswith(b"\r\n")
    assert original.startswith(headers[:-2])


def test_non_ascii_original_headers_are_quoted_printable() -> None:
    original = "Subject: Grüße\r\nFrom: jörg@bücher.example\r\n\r\nbody\r\n".encode()
    report = build(original_message=original)
    assert report.isascii()
    _, _, part = parts(report)
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers_part(report) == original.split(b"\r\n\r\n")[0] + b"\r\n"


def test_non_ascii_sender_is_written_as_utf8() -> None:
    # RFC 6532: the only way to write such an address; the bounce needs SMTPUTF8 in any case.
    report = build(original_mail_from="jörg@bücher.example")
    assert "To: <jörg@bücher.example>\r\n".encode() in report


# --- what build_bounce refuses ---


@pytest.mark.parametrize(
    "overrides",
    [
        {"original_mail_from": ""},  # no bounce to a bounce (RFC 5321 §4.5.5)
        {"original_mail_from": "alice@sender.example\r\nBcc: eve@evil.example"},
        {"original_mail_from": "a" * 600 + "@sender.example"},
        {"reporting_mta": "mail.sender.example\r\nX: y"},
        {"reporting_mta": ""},
        {"message_id": "<id@host>\r\nX: y"},
        {"message_id": "id@host"},
        {"original_queue_id": "ID\r\nX: y"},
        {"recipients": []},
        {"recipients": [FailedRecipient("bob@example.com", "2.0.0", None, None, "?", NOW)]},
        {"recipients": [FailedRecipient("bob@example.com", "5.1", None, None, "?", NOW)]},
        {"recipients": [FailedRecipient("bob@example.com\r\nX: y", "5.1.1", None, None, "?", NOW)]},
        {"recipients": [FailedRecipient("", "5.1.1", None, None, "?", NOW)]},
        {"recipients": [FailedRecipient("bob@example.com", "5.1.1", None, None, "?", datetime(2026, 1, 1))]},
        {"now": datetime(2026, 11, 23, 12, 0)},
        {"original_accepted_at": datetime(2026, 11, 23, 12, 0)},
    ],
)
def test_refuses_what_cannot_make_a_well_formed_report(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build(**overrides)


# --- enhanced_status ---


@pytest.mark.parametrize(
    ("reply", "permanent", "expected"),
    [
        ("550 5.1.1 x", True, "5.1.1"),
        ("550 5.1.1 x", False, "5.1.1"),  # the reply decides, not the flag
        ("550 no", True, "5.0.0"),
        ("550 no", False, "5.0.0"),
        ("451 x", True, "4.0.0"),
        ("452 4.2.2 full", True, "4.2.2"),
        ("550-5.7.1 first line of a multi-line reply", True, "5.7.1"),
        ("550 5.1.1", True, "5.1.1"),  # the enhanced code alone, at the end
        ("554 5.7.133 long detail", True, "5.7.133"),
        ("550 4.2.2 mismatched class", True, "5.2.2"),  # the reply code's class wins
        ("550", True, "5.0.0"),
        # Only the code right after the reply code counts, not one later in the text.
        ("550 user unknown (5.1.1)", True, "5.0.0"),
        ("550 mailbox 5.1.1 gone", False, "5.0.0"),
        ("550 5.1.1x not a code", True, "5.0.0"),
        ("550 5.1.1.1 not a code", True, "5.0.0"),
        ("550 5.1111.1 not a code", True, "5.0.0"),
        # Not a failure reply: the caller is reporting a failure, so the flag decides.
        ("250 ok", True, "5.0.0"),
        ("250 2.1.5 ok", False, "4.0.0"),
        ("354 go ahead", True, "5.0.0"),
        # No reply, or no reply code: the flag decides.
        (None, True, "5.0.0"),
        (None, False, "4.0.0"),
        ("", True, "5.0.0"),
        ("connection refused", False, "4.0.0"),
        ("5.1.1 no reply code", True, "5.0.0"),
        ("\uff15\uff15\uff10 \uff15.\uff11.\uff11 fullwidth digits", False, "4.0.0"),
    ],
)
def test_enhanced_status(reply: str | None, permanent: bool, expected: str) -> None:
    assert enhanced_status(reply, permanent=permanent) == expected


def test_enhanced_status_feeds_build_bounce() -> None:
    # Whatever enhanced_status returns, build_bounce accepts as a failure status.
    for reply in ("250 2.0.0 ok", "550 4.2.2 x", None, "bogus"):
        for permanent in (True, False):
            status = enhanced_status(reply, permanent=permanent)
            recipient = FailedRecipient("bob@example.com", status, reply, None, "Failed.", NOW)
            assert fields(status_blocks(build(recipients=[recipient]))[1])["Status"] == status
