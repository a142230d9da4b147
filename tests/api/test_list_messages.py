"""``POST /settings/listMessages`` (SPEC §5): an SMTP user's messages, newest first, with each
recipient's delivery state, attempts and last reply; paging; the error rules of SPEC §2.

Mail goes in through the real SMTP server. No delivery worker runs here, so recipients stay
``queued`` unless a test moves them on itself, writing the rows as the delivery worker would.
"""

from __future__ import annotations

import re
import secrets
import smtplib
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.schema import messages, recipients
from tests.smtp.helpers import SmtpUser, add_smtp_user, logged_in, queue_id_of, stored_message
from tests.support import Owner, ServerProcess, store_write

MESSAGE = b"Subject: test\r\nFrom: app@example.com\r\n\r\nHello.\r\n"
ISO_SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MESSAGE_FIELDS = {"queue_id", "accepted_at", "mail_from", "size_bytes", "recipients"}
RECIPIENT_FIELDS = {"address", "state", "attempts", "last_reply", "last_attempt_at", "next_attempt_at"}


@pytest.fixture
def user(server: ServerProcess, owner: Owner) -> SmtpUser:
    return add_smtp_user(server, owner)


def _send(client: smtplib.SMTP, mail_from: str, to: list[str], data: bytes = MESSAGE) -> str:
    """One SMTP transaction on a logged-in session; returns the queue id of its 250."""
    code, reply = client.mail(mail_from)
    assert code == 250, reply
    for address in to:
        code, reply = client.rcpt(address)
        assert code == 250, reply
    code, reply = client.data(data)
    assert code == 250, reply
    return queue_id_of(reply)


def _send_many(server: ServerProcess, user: SmtpUser, count: int) -> list[str]:
    with logged_in(server, user) as client:
        return [_send(client, f"app{i}@example.com", [f"r{i}@example.net"]) for i in range(count)]


def _list(server: ServerProcess, owner: Owner, user: SmtpUser, **paging: Any) -> dict[str, Any]:
    response = server.post("listMessages", owner.creds(smtp_user_name=user.name, **paging))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = dict(response.json())
    assert body["status"] == "success"
    return body


def _queue_ids(body: dict[str, Any]) -> list[str]:
    return [message["queue_id"] for message in body["messages"]]


def _error(response: httpx.Response, type_name: str, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error"
    assert body["code"] == "-1"
    assert body["name"] == body["type"] == type_name
    assert response.headers["cache-control"] == "no-store"
    return str(body["message"])


def _parse_iso(text: str) -> datetime:
    assert ISO_SECONDS.match(text), text
    return datetime.fromisoformat(text)


# --- what is listed -----------------------------------------------------------------------------


def test_messages_are_listed_newest_first_with_every_field(
    server: ServerProcess, owner: Owner, user: SmtpUser
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    sent = []  # (queue id, sender, recipients), oldest first
    with logged_in(server, user) as client:
        for mail_from, to in [
            ("first@example.com", ["a@example.net"]),
            ("second@example.com", ["b@example.net", "c@example.org", "d@example.net"]),
            ("third@example.com", ["e@example.org", "f@example.net"]),
        ]:
            sent.append((_send(client, mail_from, to), mail_from, to))
    after = datetime.now(UTC)

    body = _list(server, owner, user)
    assert set(body) == {"status", "message", "messages", "limit", "offset", "has_more"}
    assert body["message"] == "3 messages"
    assert (body["limit"], body["offset"], body["has_more"]) == (20, 0, False)
    assert _queue_ids(body) == [queue_id for queue_id, _, _ in reversed(sent)]

    for listed, (queue_id, mail_from, to) in zip(body["messages"], reversed(sent), strict=True):
        assert set(listed) == MESSAGE_FIELDS
        assert listed["mail_from"] == mail_from
        stored = stored_message(server, queue_id)
        assert stored is not None
        assert listed["size_bytes"] == len(stored.data)  # as stored, with our Received header
        accepted_at = _parse_iso(listed["accepted_at"])
        assert before <= accepted_at <= after
        assert [r["address"] for r in listed["recipients"]] == to  # in RCPT order
        for recipient in listed["recipients"]:
            assert set(recipient) == RECIPIENT_FIELDS
            assert recipient["state"] == "queued"
            assert recipient["attempts"] == 0
            assert recipient["last_reply"] is None
            assert recipient["last_attempt_at"] is None
            assert recipient["next_attempt_at"] == listed["accepted_at"]  # due at once
    times = [m["accepted_at"] for m in body["messages"]]
    assert times == sorted(times, reverse=True)


def test_the_null_sender_is_an_empty_mail_from(server: ServerProcess, owner: Owner, user: SmtpUser) -> None:
    with logged_in(server, user) as client:
        queue_id = _send(client, "", ["a@example.net"])
    [listed] = _list(server, owner, user)["messages"]
    assert (listed["queue_id"], listed["mail_from"]) == (queue_id, "")


def test_no_messages_and_one_message(server: ServerProcess, owner: Owner, user: SmtpUser) -> None:
    assert _list(server, owner, user) == {
        "status": "success",
        "message": "0 messages",
        "messages": [],
        "limit": 20,
        "offset": 0,
        "has_more": False,
    }
    _send_many(server, user, 1)
    assert _list(server, owner, user)["message"] == "1 message"


def test_each_smtp_user_lists_only_its_own_messages(
    server: ServerProcess, owner: Owner, other_owner: Owner, user: SmtpUser
) -> None:
    second = add_smtp_user(server, owner)
    theirs = add_smtp_user(server, other_owner)
    mine = _send_many(server, user, 2)
    mine_too = _send_many(server, second, 1)
    not_mine = _send_many(server, theirs, 3)
    assert _queue_ids(_list(server, owner, user)) == mine[::-1]
    assert _queue_ids(_list(server, owner, second)) == mine_too
    assert _queue_ids(_list(server, other_owner, theirs)) == not_mine[::-1]


def test_a_bounce_report_is_not_listed(server: ServerProcess, owner: Owner, user: SmtpUser) -> None:
    [queue_id] = _send_many(server, user, 1)

    def add_bounce_report(conn: Connection) -> None:
        # What the delivery worker queues for a bounce: PowerEmail's own message, under no SMTP user.
        original = conn.execute(
            sa.select(messages.c.id, messages.c.mail_from).where(messages.c.queue_id == queue_id)
        ).one()
        now = datetime.now(UTC) + timedelta(minutes=1)  # newer than the user's message
        bounce_id = conn.execute(
            messages.insert()
            .values(
                queue_id=secrets.token_hex(8).upper(),
                smtp_user_id=None,
                mail_from="",
                recipient_count=1,
                size_bytes=1000,
                accepted_at=now,
                sent_total_after=0,
                bounce_of=original.id,
            )
            .returning(messages.c.id)
        ).scalar_one()
        conn.execute(
            recipients.insert().values(
                message_id=bounce_id, address=original.mail_from, domain="example.com", next_attempt_at=now
            )
        )

    store_write(server.database_url, add_bounce_report)
    assert _queue_ids(_list(server, owner, user)) == [queue_id]


# --- delivery states ----------------------------------------------------------------------------


def test_each_delivery_state_with_its_attempts_and_last_reply(
    server: ServerProcess, owner: Owner, user: SmtpUser
) -> None:
    to = ["queued@example.net", "deferred@example.net", "delivered@example.org", "bounced@example.org"]
    with logged_in(server, user) as client:
        queue_id = _send(client, "app@example.com", to)
    tried = datetime(2026, 11, 23, 23, 4, 55, 678_000, tzinfo=UTC)  # microseconds are not shown
    retry = tried + timedelta(minutes=5)
    # As the delivery worker records attempts (a later test checks the real worker end to end).
    outcomes = {
        "deferred@example.net": {
            "state": "deferred",
            "attempts": 2,
            "last_reply": "451 4.7.1 Greylisted, try again later",
            "last_attempt_at": tried,
            "next_attempt_at": retry,
        },
        "delivered@example.org": {
            "state": "delivered",
            "attempts": 1,
            "last_reply": "250 2.0.0 Ok: queued as 4XyZ",
            "last_attempt_at": tried,
            "next_attempt_at": retry,  # whatever it holds, a final state shows no due time
        },
        "bounced@example.org": {
            "state": "bounced",
            "attempts": 3,
            "last_reply": "550 5.1.1 <bounced@example.org>: Recipient address rejected",
            "last_attempt_at": tried,
            "next_attempt_at": retry,
        },
    }

    def record(conn: Connection) -> None:
        message_id = sa.select(messages.c.id).where(messages.c.queue_id == queue_id).scalar_subquery()
        for address, values in outcomes.items():
            conn.execute(
                recipients.update()
                .where(recipients.c.message_id == message_id, recipients.c.address == address)
                .values(**values)
            )

    store_write(server.database_url, record)

    [listed] = _list(server, owner, user)["messages"]
    assert listed["queue_id"] == queue_id
    assert listed["recipients"] == [
        {
            "address": "queued@example.net",
            "state": "queued",
            "attempts": 0,
            "last_reply": None,
            "last_attempt_at": None,
            "next_attempt_at": listed["accepted_at"],
        },
        {
            "address": "deferred@example.net",
            "state": "deferred",
            "attempts": 2,
            "last_reply": "451 4.7.1 Greylisted, try again later",
            "last_attempt_at": "2026-11-23T23:04:55Z",
            "next_attempt_at": "2026-11-23T23:09:55Z",
        },
        {
            "address": "delivered@example.org",
            "state": "delivered",
            "attempts": 1,
            "last_reply": "250 2.0.0 Ok: queued as 4XyZ",
            "last_attempt_at": "2026-11-23T23:04:55Z",
            "next_attempt_at": None,
        },
        {
            "address": "bounced@example.org",
            "state": "bounced",
            "attempts": 3,
            "last_reply": "550 5.1.1 <bounced@example.org>: Recipient address rejected",
            "last_attempt_at": "2026-11-23T23:04:55Z",
            "next_attempt_at": None,
        },
    ]


# --- paging -------------------------------------------------------------------------------------


def test_pages_walk_back_through_the_messages(server: ServerProcess, owner: Owner, user: SmtpUser) -> None:
    newest_first = _send_many(server, user, 5)[::-1]

    pages = []
    for offset, expected_more in [(0, True), (2, True), (4, False)]:
        page = _list(server, owner, user, limit=2, offset=offset)
        assert (page["limit"], page["offset"], page["has_more"]) == (2, offset, expected_more)
        pages += _queue_ids(page)
    assert pages == newest_first

    exactly_all = _list(server, owner, user, limit=5)
    assert (_queue_ids(exactly_all), exactly_all["has_more"]) == (newest_first, False)
    past_the_end = _list(server, owner, user, limit=2, offset=5)
    assert (past_the_end["messages"], past_the_end["has_more"], past_the_end["message"]) == (
        [],
        False,
        "0 messages",
    )
    # Strings of digits, as a form sends them.
    response = server.post("listMessages", data=owner.creds(smtp_user_name=user.name, limit="2", offset="1"))
    assert response.status_code == 200, response.text
    assert response.json()["message"] == "2 messages"
    assert (_queue_ids(response.json()), response.json()["has_more"]) == (newest_first[1:3], True)
    assert (response.json()["limit"], response.json()["offset"]) == (2, 1)


def test_twenty_by_default_and_at_most_a_hundred(server: ServerProcess, owner: Owner, user: SmtpUser) -> None:
    newest_first = _send_many(server, user, 21)[::-1]
    default = _list(server, owner, user)
    assert (_queue_ids(default), default["limit"], default["has_more"]) == (newest_first[:20], 20, True)
    everything = _list(server, owner, user, limit=100)
    assert (_queue_ids(everything), everything["has_more"]) == (newest_first, False)
    assert _queue_ids(_list(server, owner, user, offset=20)) == newest_first[20:]


# --- errors -------------------------------------------------------------------------------------

LIMIT_RULE = "limit must be a whole number from 1 to 100"
OFFSET_RULE = "offset must be a whole number from 0 to 2147483647"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"limit": 0}, LIMIT_RULE),
        ({"limit": 101}, LIMIT_RULE),
        ({"limit": "x"}, LIMIT_RULE),
        ({"limit": True}, LIMIT_RULE),
        ({"limit": 1.5}, LIMIT_RULE),
        ({"limit": 5.0}, LIMIT_RULE),
        ({"limit": "1.5"}, LIMIT_RULE),
        ({"limit": "-1"}, LIMIT_RULE),
        ({"limit": ""}, LIMIT_RULE),
        ({"limit": None}, LIMIT_RULE),
        ({"limit": [5]}, LIMIT_RULE),
        ({"offset": -1}, OFFSET_RULE),
        ({"offset": "-1"}, OFFSET_RULE),
        ({"offset": 1.5}, OFFSET_RULE),
        ({"offset": False}, OFFSET_RULE),
        ({"offset": 2**63}, OFFSET_RULE),  # never reaches the database as a number it cannot hold
        ({"limit": 0, "offset": -1}, f"{LIMIT_RULE}; {OFFSET_RULE}"),
        ({"page": 2}, "unknown parameter page"),
        ({"smtp_user_name": None}, "smtp_user_name must be a string"),
        ({"smtp_user_name": ""}, "smtp_user_name must not be empty"),
        ({"smtp_user_name": 5}, "smtp_user_name must be a string"),
    ],
    ids=repr,
)
def test_each_bad_parameter_is_refused_and_named(
    server: ServerProcess, owner: Owner, user: SmtpUser, params: dict[str, Any], expected: str
) -> None:
    response = server.post("listMessages", {**owner.creds(smtp_user_name=user.name), **params})
    assert _error(response, "ValidationError", 400) == expected


@pytest.mark.parametrize("missing", ["owner_id", "token", "smtp_user_name"])
def test_each_missing_parameter_is_named(
    server: ServerProcess, owner: Owner, user: SmtpUser, missing: str
) -> None:
    params = owner.creds(smtp_user_name=user.name)
    del params[missing]
    assert _error(server.post("listMessages", params), "ValidationError", 400) == f"{missing} is required"


def test_the_widest_paging_values_are_accepted(server: ServerProcess, owner: Owner, user: SmtpUser) -> None:
    page = _list(server, owner, user, limit="100", offset=2147483647)
    assert (page["messages"], page["limit"], page["offset"], page["has_more"]) == ([], 100, 2147483647, False)
    assert _list(server, owner, user, limit=1, offset="0")["limit"] == 1


def test_a_wrong_token_or_unknown_owner_is_an_authentication_error(
    server: ServerProcess, owner: Owner, user: SmtpUser
) -> None:
    params = owner.creds(smtp_user_name=user.name)
    wrong_token = _error(
        server.post("listMessages", {**params, "token": owner.token + "x"}), "AuthenticationError", 401
    )
    unknown = _error(
        server.post("listMessages", {**params, "owner_id": "nobody"}), "AuthenticationError", 401
    )
    assert wrong_token == unknown == "Token MissMatch"


def test_checking_order_parameters_then_owner_then_smtp_user(server: ServerProcess, owner: Owner) -> None:
    bad_limit_and_token = {**owner.creds(smtp_user_name="smtp1000000001", limit=0), "token": "wrong"}
    response = server.post("listMessages", bad_limit_and_token)
    assert _error(response, "ValidationError", 400) == LIMIT_RULE
    bad_token = {**owner.creds(smtp_user_name="smtp1000000001"), "token": "wrong"}
    _error(server.post("listMessages", bad_token), "AuthenticationError", 401)


def test_another_owners_user_is_the_same_error_as_a_missing_one(
    server: ServerProcess, owner: Owner, other_owner: Owner, user: SmtpUser
) -> None:
    _send_many(server, user, 1)
    missing = "smtp1000000001"
    answers = [
        server.post("listMessages", other_owner.creds(smtp_user_name=name)) for name in (user.name, missing)
    ]
    texts = [_error(answer, "ValidationError", 400) for answer in answers]
    assert texts[0].replace(user.name, "X") == texts[1].replace(missing, "X")
    assert "smtp_user_name" in texts[0]
    assert "messages" not in answers[0].json()


def test_a_deleted_users_messages_are_no_longer_listed(
    server: ServerProcess, owner: Owner, user: SmtpUser
) -> None:
    _send_many(server, user, 1)
    assert server.post("deleteSmtp", owner.creds(smtp_user_name=user.name)).status_code == 200
    response = server.post("listMessages", owner.creds(smtp_user_name=user.name))
    assert "smtp_user_name" in _error(response, "ValidationError", 400)


# --- documentation ------------------------------------------------------------------------------


def test_openapi_documents_list_messages(server: ServerProcess) -> None:
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    operation = spec["paths"]["/settings/listMessages"]["post"]
    assert operation["operationId"] == "listMessages"
    assert "newest first" in operation["description"]
    content = operation["requestBody"]["content"]["application/json"]
    assert content["schema"]["required"] == ["owner_id", "token", "smtp_user_name"]
    assert set(content["schema"]["properties"]) == {"owner_id", "token", "smtp_user_name", "limit", "offset"}
    assert content["schema"]["properties"]["limit"]["default"] == 20
    assert content["example"] == {
        "owner_id": "example id",
        "token": "example token",
        "smtp_user_name": "smtp12345",
        "limit": 20,
        "offset": 0,
    }
    schemas = spec["components"]["schemas"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ListMessagesResponse"
    }
    assert set(schemas["ListMessagesResponse"]["properties"]) == {
        "status",
        "message",
        "messages",
        "limit",
        "offset",
        "has_more",
    }
    assert set(schemas["MessageEntry"]["properties"]) == MESSAGE_FIELDS
    assert set(schemas["RecipientEntry"]["properties"]) == RECIPIENT_FIELDS
    assert schemas["RecipientEntry"]["properties"]["state"]["enum"] == [
        "queued",
        "deferred",
        "delivered",
        "bounced",
    ]
