"""The bounce report: one RFC 3464 delivery status notification per bounce event (SPEC §5).

When the delivery worker gives up on recipients of a message, the envelope sender gets one report,
from the null sender, naming every recipient that failed in that event. This module only builds the
bytes of that report; queueing and sending it are the worker's business. Pure functions; no I/O.

The report is a ``multipart/report`` (RFC 6522) with three parts: a readable ``text/plain``
explanation, the machine-readable ``message/delivery-status`` (RFC 3464 §2) and the original
message's header block as ``text/rfc822-headers`` (RFC 6522 §4; never the body, to keep bounces
small and not to send the content back).

We assemble the MIME structure by hand rather than with the ``email`` package: its generator writes
a ``message/delivery-status`` payload as a list of header blocks and re-folds their values under its
own policy (it puts RFC 2047 encoded-words into DSN fields, which RFC 3464 does not allow), and
the exact bytes matter here: CRLF everywhere, 7-bit where possible, no line over 998 octets
(RFC 5322 §2.1.1). The tests read every report back with ``email`` to check it parses as intended.
"""

from __future__ import annotations

import binascii
import re
import secrets
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from poweremail.smtp.message import header_block, normalize_line_endings

SUBJECT = "Undelivered Mail Returned to Sender"
# The original message's header block is capped so a message with enormous headers (or none, so
# the whole message counts as headers) cannot make an enormous bounce.
MAX_ORIGINAL_HEADERS = 64 * 1024
# A remote reply is at most a few lines of 512 octets (RFC 5321 §4.5.3.1.5); anything longer is
# cut here, because it appears twice per recipient and a bounce may list many recipients.
MAX_DIAGNOSTIC = 1000
# No address longer fits in an SMTP command line (512 octets, RFC 5321 §4.5.3.1.4); the limit keeps
# the To: line, which cannot be folded inside an address, far below 998 octets.
MAX_ADDRESS = 512

# RFC 5321 §4.2: a reply starts with a three-digit code, then SP (last line) or "-" (a line of a
# multi-line reply). RFC 2034 §4 / RFC 3463 §2: the enhanced status code, when the server sends
# one, comes right after that separator and is followed by a space; only there does it count, not
# a "5.1.1" that merely appears later in the text. [0-9], not \d: \d also matches non-ASCII digits.
_REPLY = re.compile(
    r"\A\s*(?P<code_class>[0-9])[0-9]{2}(?:[ -]|\Z)"
    r"(?:(?P<status_class>[245])\.(?P<subject>[0-9]{1,3})\.(?P<detail>[0-9]{1,3})(?=\s|\Z))?"
)
# What build_bounce accepts as a recipient's status: RFC 3463 §2 syntax, and only the failure
# classes, because every recipient in the report has "Action: failed" (RFC 3464 §2.3.3).
_FAILURE_STATUS = re.compile(r"\A[45]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
# Our own host name, as a domain or an address literal (RFC 5321 §4.1.3).
_HOSTNAME = re.compile(r"\A(?:[A-Za-z0-9_.-]+|\[[A-Za-z0-9.:]+\])\Z")
_MESSAGE_ID = re.compile(r"\A<[!-;=?-~]+>\Z")  # printable ASCII, no space, no inner "<" or ">"
_QUEUE_ID = re.compile(r"\A[!-~]+\Z")
# C0 and C1 controls (CR and LF among them) and the Unicode line and paragraph separators: none of
# them may reach a header field, where a line break would start a new field (header injection).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# RFC 5322 §2.1.1: lines SHOULD be at most 78 characters; we fold there when there is a space.
_FOLD_AT = 78
# A run without spaces longer than this cannot be folded; it is split (see _fold).
_LONGEST_WORD = 900
_MAX_LINE = 998  # octets, without the CRLF (RFC 5322 §2.1.1)


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the delivery worker gave up on, with what it knows about why."""

    address: str  # the original RCPT address
    status: str  # RFC 3463 enhanced status, e.g. "5.1.1", "4.4.7"
    diagnostic: str | None  # the remote server's reply, e.g. "550 5.1.1 <bob@x>: no such user"
    remote_mta: str | None  # the host that gave the reply, e.g. "mx1.example.com"
    reason: str  # one human sentence, e.g. "The recipient's server refused it."
    last_attempt_at: datetime  # tz-aware


def enhanced_status(reply: str | None, *, permanent: bool) -> str:
    """The RFC 3463 status for a failure with this reply.

    The enhanced code right after the reply code counts ("550 5.1.1 ..." -> "5.1.1"); without
    one, the reply code's class gives "x.0.0" ("550 no" -> "5.0.0", "451 x" -> "4.0.0"). With no
    reply, or one that is not a failure (not 4xx or 5xx, e.g. "250 ok", or no reply code at all),
    ``permanent`` decides between "5.0.0" and "4.0.0": the caller is reporting a failure, so the
    result is always class 4 or 5. When the enhanced code's class disagrees with the reply code's
    ("550 4.2.2 ..."), the reply code wins ("5.2.2"): it is the code SMTP clients act on
    (RFC 5321 §4.2.1), and the subject and detail still say what went wrong.
    """
    fallback = "5.0.0" if permanent else "4.0.0"
    match = _REPLY.match(reply) if reply is not None else None
    if match is None or match["code_class"] not in "45":
        return fallback
    if match["status_class"] is None:
        return f"{match['code_class']}.0.0"
    return f"{match['code_class']}.{match['subject']}.{match['detail']}"


def build_bounce(
    *,
    reporting_mta: str,
    original_mail_from: str,
    original_queue_id: str,
    original_accepted_at: datetime,
    original_message: bytes,
    recipients: Sequence[FailedRecipient],
    now: datetime,
    message_id: str,
) -> bytes:
    """The complete bounce report (headers and body, CRLF line endings) to send to the sender.

    ``reporting_mta`` is our host name; ``original_mail_from`` the envelope sender the report goes
    to, which must not be the null sender (RFC 5321 §4.5.5: a bounce is never bounced);
    ``original_message`` the stored message, of which only the header block is attached;
    ``message_id`` the report's own Message-ID, "<...>". Every datetime must be tz-aware.

    Values of our own (host name, addresses, ids, times) that could not appear in a well-formed
    report raise ValueError: they mean a bug upstream. What remote servers said (the replies and
    host names) is made safe instead: put on one line, non-ASCII escaped, long replies cut.
    """
    if not _HOSTNAME.match(reporting_mta):
        raise ValueError(f"not a host name: {reporting_mta!r}")
    if not original_mail_from:
        raise ValueError("no bounce to the null sender (RFC 5321 §4.5.5)")
    _check_address("original_mail_from", original_mail_from)
    if not _QUEUE_ID.match(original_queue_id):
        raise ValueError(f"not a queue id: {original_queue_id!r}")
    if not _MESSAGE_ID.match(message_id):
        raise ValueError(f"not a Message-ID: {message_id!r}")
    if not recipients:
        raise ValueError("a bounce report names at least one recipient")
    for recipient in recipients:
        _check_address("recipient address", recipient.address)
        if not _FAILURE_STATUS.match(recipient.status):
            raise ValueError(f"not a failure status (RFC 3463): {recipient.status!r}")
    now = _utc(now)
    accepted_at = _utc(original_accepted_at)

    headers, truncated = _original_headers(original_message)
    text = _explanation(
        reporting_mta=reporting_mta,
        queue_id=original_queue_id,
        accepted_at=accepted_at,
        recipients=recipients,
        headers_truncated=truncated,
    )
    text_encoding, text_body = _transfer_encoding(text.encode("utf-8"))
    headers_encoding, headers_body = _transfer_encoding(headers)
    status_body = _delivery_status(
        reporting_mta=reporting_mta,
        queue_id=original_queue_id,
        accepted_at=accepted_at,
        recipients=recipients,
    )
    parts = [
        (
            "Content-Description: Notification\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: {text_encoding}\r\n",
            text_body,
        ),
        (
            # 7bit, always, so _delivery_status escapes all else: RFC 3464 §2.1 asks for 7bit so
            # that it reads without MIME decoding, and RFC 2045 §6.4 allows no QP/base64 on message/*.
            "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n",
            status_body,
        ),
        (
            "Content-Description: Undelivered message headers\r\n"
            "Content-Type: text/rfc822-headers\r\n"
            f"Content-Transfer-Encoding: {headers_encoding}\r\n",
            headers_body,
        ),
    ]
    boundary = _boundary(body for _, body in parts)

    out = [
        f"Date: {format_datetime(now)}\r\n".encode(),
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n".encode(),
        # An SMTPUTF8 sender's address goes here as raw UTF-8 (RFC 6532 §3.2): an address cannot be
        # encoded any other way, and the bounce then needs SMTPUTF8 anyway for its envelope.
        f"To: <{original_mail_from}>\r\n".encode(),
        f"Subject: {SUBJECT}\r\n".encode(),
        f"Message-ID: {message_id}\r\n".encode(),
        # RFC 3834 §5: marks the report as automatic, so auto-responders (vacation replies) and
        # mailing lists do not answer or redistribute it.
        b"Auto-Submitted: auto-replied\r\n",
        b"MIME-Version: 1.0\r\n",
        # RFC 6522 §3: report-type names the machine-readable second part.
        b"Content-Type: multipart/report; report-type=delivery-status;\r\n",
        f' boundary="{boundary}"\r\n'.encode(),
        b"\r\n",
        # RFC 2046 §5.1.1: the preamble is for readers that do not understand MIME.
        b"This is a delivery status notification in MIME format (RFC 3464).\r\n",
    ]
    for part_headers, body in parts:
        out += [f"\r\n--{boundary}\r\n{part_headers}\r\n".encode(), body]
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out)


def _check_address(what: str, value: str) -> None:
    if not value:
        raise ValueError(f"{what} is empty")
    if _CONTROLS.search(value):
        raise ValueError(f"{what} contains a control character: {value!r}")
    if len(value.encode("utf-8")) > MAX_ADDRESS:
        raise ValueError(f"{what} is longer than {MAX_ADDRESS} octets")


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime: {moment!r}")
    return moment.astimezone(UTC)


def _one_line(text: str) -> str:
    """``text`` with every control (CR and LF among them) a space and runs of white space one space.

    A multi-line reply thus becomes one line: its lines joined by spaces.
    """
    return " ".join(_CONTROLS.sub(" ", text).split())


def _diagnostic(reply: str) -> str:
    """A remote reply, on one line and capped at MAX_DIAGNOSTIC characters.

    We cut rather than keep the whole of an overlong reply: the useful part of a reply is its
    start (code, enhanced code, the server's reason); what follows a thousand characters is noise
    that a remote server could otherwise use to inflate every bounce it causes.
    """
    line = _one_line(reply)
    if len(line) > MAX_DIAGNOSTIC:
        line = line[: MAX_DIAGNOSTIC - 4].rstrip() + " ..."
    return line


def _seven_bit(text: str) -> str:
    """``text`` with every non-ASCII character as RFC 6533 §3's EmbeddedUnicodeChar, \\x{HEX}.

    message/delivery-status is 7-bit (RFC 3464 §2.1); RFC 6533 gives this escape for its 7-bit
    form. Remote replies can be UTF-8 under SMTPUTF8 (RFC 6531); the readable part of the report
    shows them unescaped. A backslash already in the text stays as it is: the field is for people.
    """
    return "".join(c if c.isascii() else f"\\x{{{ord(c):02X}}}" for c in text)


def _utf8_addr_xtext(address: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: QCHAR as itself, all else (SP, "\\", "+", "=", non-ASCII)
    as \\x{HEX}, uppercase, without leading zeros beyond two digits (HEXPOINT)."""
    return "".join(c if "!" <= c <= "~" and c not in "\\+=" else f"\\x{{{ord(c):02X}}}" for c in address)


def _final_recipient(address: str) -> str:
    # RFC 3464 §2.3.2 / RFC 6533 §3: an all-ASCII address is type rfc822; any other is type utf-8,
    # in its 7-bit xtext form because this is message/delivery-status, not the 8-bit
    # message/global-delivery-status.
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_addr_xtext(address)}"


def _fold(name: str, value: str) -> str:
    """One header field, folded at spaces (RFC 5322 §2.2.3) to lines of at most 78 characters.

    Unfolding (removing each CRLF) gives back ``value`` exactly, except that a run of more than
    _LONGEST_WORD characters without a space is split with a space so that no line exceeds 998
    octets; nothing a real server sends has such a run.
    """
    words: list[str] = []
    for word in value.split(" "):
        words += [word[i : i + _LONGEST_WORD] for i in range(0, len(word), _LONGEST_WORD)] or [""]
    lines: list[str] = []
    line = f"{name}:"
    for index, word in enumerate(words):
        if index > 0 and len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _delivery_status(
    *, reporting_mta: str, queue_id: str, accepted_at: datetime, recipients: Sequence[FailedRecipient]
) -> bytes:
    """The message/delivery-status body: per-message fields, then one block per recipient
    (RFC 3464 §2.1), blocks separated by blank lines."""
    blocks = [
        "".join(
            [
                _fold("Reporting-MTA", f"dns; {reporting_mta}"),
                # RFC 3464 §2.4: X- extension fields are allowed; this names our queue entry.
                _fold("X-PowerEmail-Queue-ID", queue_id),
                _fold("Arrival-Date", format_datetime(accepted_at)),
            ]
        )
    ]
    for recipient in recipients:
        fields = [
            _fold("Final-Recipient", _final_recipient(recipient.address)),
            _fold("Action", "failed"),
            _fold("Status", recipient.status),
        ]
        remote_mta = _seven_bit(_one_line(recipient.remote_mta or "")).replace(" ", "")
        if remote_mta:
            fields.append(_fold("Remote-MTA", f"dns; {remote_mta}"))
        diagnostic = _seven_bit(_diagnostic(recipient.diagnostic or ""))
        if diagnostic:
            fields.append(_fold("Diagnostic-Code", f"smtp; {diagnostic}"))
        fields.append(_fold("Last-Attempt-Date", format_datetime(_utc(recipient.last_attempt_at))))
        blocks.append("".join(fields))
    return "\r\n".join(blocks).encode("ascii")


def _explanation(
    *,
    reporting_mta: str,
    queue_id: str,
    accepted_at: datetime,
    recipients: Sequence[FailedRecipient],
    headers_truncated: bool,
) -> str:
    """The readable first part: who did not get the message, and why, in plain words."""
    wrap = textwrap.TextWrapper(width=76, break_long_words=True, break_on_hyphens=False)
    paragraphs = [
        f"This is the mail delivery system at {reporting_mta}.",
        "Your message could not be delivered to "
        + ("the recipient below" if len(recipients) == 1 else f"the {len(recipients)} recipients below")
        + f". It was accepted on {format_datetime(accepted_at)} with queue ID {queue_id}.",
    ]
    lines = [line for paragraph in paragraphs for line in [*wrap.wrap(paragraph), ""]]
    detail = textwrap.TextWrapper(
        width=76, initial_indent="    ", subsequent_indent="      ", break_long_words=True
    )
    for recipient in recipients:
        lines.append(f"<{recipient.address}>")
        lines += detail.wrap(_one_line(recipient.reason))
        lines += detail.wrap(f"Status: {recipient.status}")
        if recipient.diagnostic and (diagnostic := _diagnostic(recipient.diagnostic)):
            server = _one_line(recipient.remote_mta or "") or "The remote server"
            lines += detail.wrap(f"{server} replied: {diagnostic}")
        lines.append("")
    closing = "The delivery report and the headers of your message are attached."
    if headers_truncated:
        closing += f" The headers were longer than {MAX_ORIGINAL_HEADERS // 1024} KiB and are cut short."
    lines += wrap.wrap(closing)
    return "\r\n".join(lines) + "\r\n"


def _original_headers(message: bytes) -> tuple[bytes, bool]:
    """The message's header block (up to and without the empty line), capped at
    MAX_ORIGINAL_HEADERS octets at a line end; with True if it was capped.

    A message with no empty line is all header block (RFC 5322 §2.1: the body is optional).
    """
    # Only the start can matter, so a large body is never scanned for the empty line. Stored
    # messages have CRLF line endings already (SPEC §4); normalizing first makes sure of it.
    block = header_block(normalize_line_endings(message[: MAX_ORIGINAL_HEADERS + 4]))
    if not block.endswith(b"\r\n") and block:
        block += b"\r\n"
    if len(block) <= MAX_ORIGINAL_HEADERS:
        return block, False
    cut = block.rfind(b"\r\n", 0, MAX_ORIGINAL_HEADERS - 1)
    # Cut after the last whole line; a single line longer than the cap is cut within it.
    block = block[: cut + 2] if cut >= 0 else block[: MAX_ORIGINAL_HEADERS - 2] + b"\r\n"
    return block, True


def _transfer_encoding(data: bytes) -> tuple[str, bytes]:
    """``data`` (CRLF line endings, ending in CRLF) as a MIME part body, and its encoding.

    7bit when it is 7bit already (RFC 2045 §2.7: ASCII, no NUL, lines of at most 998 octets), else
    quoted-printable: still mostly readable, and it makes 8-bit text (a UTF-8 address or reply)
    and overlong lines safe for any server on the way, 8BITMIME or not.
    """
    if data.isascii() and b"\x00" not in data and all(len(line) <= _MAX_LINE for line in data.split(b"\r\n")):
        return "7bit", data
    # istext: line endings stay line endings (CRLF, as in the data), not =0D=0A.
    return "quoted-printable", binascii.b2a_qp(data, istext=True)


def _boundary(bodies: Iterable[bytes]) -> str:
    """A multipart boundary that occurs in none of the bodies (RFC 2046 §5.1.1).

    128 random bits make a collision practically impossible; the check makes it impossible.
    """
    contents = list(bodies)
    while True:
        boundary = f"poweremail-report-{secrets.token_hex(16)}"
        if not any(boundary.encode() in body for body in contents):
            return boundary
