"""Every reply the submission server composes, in one place; tests compare against these.

Enhanced status codes: RFC 3463; the AUTH ones: RFC 4954 §6.
"""

from __future__ import annotations

from typing import Final

MAX_RECIPIENTS: Final = 100  # SPEC §4 (RFC 5321 §4.5.3.1.8 asks servers to take at least 100)

AUTH_SUCCESS: Final = "235 2.7.0 Authentication successful"
AUTH_INVALID: Final = "535 5.7.8 Authentication credentials invalid"
AUTH_TEMPORARY_FAILURE: Final = "454 4.7.0 Temporary authentication failure"
AUTH_THROTTLED: Final = "454 4.7.0 Too many failed logins from your address; try again later"
# The same for every login name, existing or not (issue 6: no oracle); its password was not checked.
AUTH_USER_THROTTLED: Final = "454 4.7.0 Too many failed logins for this user; try again later"
# RFC 4954 6: a response to a challenge longer than the server's line.
AUTH_LINE_TOO_LONG: Final = "500 5.5.6 Authentication exchange line is too long"
AUTH_TOO_MANY_IN_SESSION: Final = "421 4.7.0 Too many failed logins; closing connection"
CREDENTIALS_REVOKED: Final = "535 5.7.8 Authentication credentials no longer valid; log in again"
AUTH_REQUIRED: Final = "530 5.7.0 Authentication required"
ENCRYPTION_REQUIRED: Final = "538 5.7.11 Encryption required for requested authentication mechanism"

SENDER_OK: Final = "250 2.1.0 Sender OK"
RECIPIENT_OK: Final = "250 2.1.5 Recipient OK"
# RFC 5321 4.1.2 (no control characters in a mailbox), 4.5.3.1.3 (a path of at most 256 octets).
BAD_SENDER: Final = "553 5.1.7 Sender address rejected: not a valid mailbox (RFC 5321 4.1.2, 4.5.3.1)"
BAD_RECIPIENT: Final = "553 5.1.3 Recipient address rejected: not a valid mailbox (RFC 5321 4.1.2, 4.5.3.1)"
BAD_SIZE: Final = "501 5.5.4 Syntax: SIZE=<number of octets, in ASCII digits> (RFC 1870)"
TOO_MANY_RECIPIENTS: Final = f"452 4.5.3 Too many recipients: at most {MAX_RECIPIENTS} per message"
MESSAGE_TOO_BIG: Final = "552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG: Final = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6: at most 1000 octets)"
DATA_LINE_RUNAWAY: Final = (
    "421 4.5.2 Line too long (RFC 5321 4.5.3.1.6: at most 1000 octets); closing connection"
)
QUEUED: Final = "250 2.0.0 Ok: queued as {queue_id}"

TOTAL_LIMIT: Final = "550 5.7.1 Total sending limit of this SMTP user reached ({limit} recipients)"
HOURLY_LIMIT: Final = (
    "451 4.7.1 Hourly sending limit of this SMTP user reached ({limit} recipients per rolling hour);"
    " sending resumes at {resume_at}"
)
HOURLY_LIMIT_NEVER: Final = (
    "550 5.7.1 This message has more recipients than the hourly limit of this SMTP user allows ({limit})"
)

TOO_MANY_CONNECTIONS: Final = "421 4.7.0 Too many connections from your address; try again later"
SESSION_TOO_LONG: Final = "421 4.4.2 Session lasted too long; closing connection"
# RFC 5321 §3.8: a server shutting down answers 421; RFC 3463 4.3.2: not accepting messages.
SHUTTING_DOWN: Final = "421 4.3.2 Service shutting down; try again later"
STORE_UNAVAILABLE: Final = "451 4.3.0 Message not stored: temporary local problem; try again later"
LOCAL_ERROR: Final = "451 4.3.0 Local error in processing"

# aiosmtpd's own replies that lack the enhanced code SPEC §4 asks for, and what we send instead.
# Rewritten in SubmissionSMTP.push(): the size checks themselves must stay in aiosmtpd, which stops
# buffering the data once it is over the limit.
REWRITES: Final = {
    "552 Error: message size exceeds fixed maximum message size": MESSAGE_TOO_BIG,
    "552 Error: Too much mail data": MESSAGE_TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": LINE_TOO_LONG,
}
