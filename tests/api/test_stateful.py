"""A stateful property test over a real ``poweremail serve``: Hypothesis runs random sequences of
addSmtp, editSmtp (limits up and down, Enable and Disable), resetSmtpPassword, deleteSmtp and
listSmtp by two owners, SMTP logins (AUTH PLAIN and LOGIN) with the current, an older and a
never-issued password, and messages to k recipients — sent whole, or left open across other calls
and finished later — and compares every answer with a model of what SPEC §2 to §4 say must happen.

Invariants, checked after every step:
- each owner's listSmtp shows exactly its own live users, oldest first, each with its last issued
  password, its status and limits, and usage equal to the model's (``sent_total``, ``sent_last_hour``);
- a recipient is accepted (RCPT 250, then DATA 250) only within the limits in force at that moment,
  and refused with the documented reply otherwise; lowering a limit below what was sent is allowed
  and simply stops sending (so ``sent_total <= total_limit`` is not an invariant: the model is);
- only the last issued password logs in, and a disabled or deleted user does not;
- no name is ever issued twice, across owners and deletions;
- another owner's user is the same ``ValidationError`` as a user that does not exist.

Every send of a run falls within one rolling hour, so the model's hourly usage is its total.
"""

from __future__ import annotations

import base64
import os
import secrets
import smtplib
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.support import Owner, ServerProcess, create_owner

LIMITS = st.integers(min_value=1, max_value=8)
RECIPIENTS = st.integers(min_value=1, max_value=4)
STATUSES = st.sampled_from(["Enable", "Disable", "enable", "DISABLE"])
MESSAGE = b"Subject: stateful\r\nFrom: app@example.com\r\n\r\nHello.\r\n"

SETTINGS = settings(
    max_examples=int(os.environ.get("POWEREMAIL_TEST_STATEFUL_EXAMPLES", "50")),
    stateful_step_count=30,
    deadline=None,  # a step is a round trip to a real server
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.too_slow],  # each step talks to the server: slow is expected
)


@dataclass
class ModelUser:
    name: str
    owner: int
    passwords: list[str]
    total_limit: int
    hourly_limit: int
    status: str = "Enable"
    sent: int = 0  # recipients accepted, all within the last hour
    deleted: bool = False

    @property
    def may_log_in(self) -> bool:
        return self.status == "Enable" and not self.deleted


@dataclass
class OpenTransaction:
    """A session that has MAIL and accepted RCPTs but no DATA yet."""

    client: smtplib.SMTP
    user: ModelUser
    recipients: int
    password_at_login: str


def _expected_rcpt(user: ModelUser, pending: int) -> int:
    """The RCPT reply code for one more recipient beside ``pending`` accepted ones (SPEC §3)."""
    if user.sent + pending + 1 > user.total_limit:
        return 550
    if user.sent + pending + 1 > user.hourly_limit:
        return 451
    return 250


def _expected_data(transaction: OpenTransaction) -> set[int]:
    """The reply codes the end of DATA may give now, with the user's state as it is now."""
    user, count = transaction.user, transaction.recipients
    if not user.may_log_in or user.passwords[-1] != transaction.password_at_login:
        return {535}  # disabled, deleted or reset mid-session: not queued
    if user.sent + count > user.total_limit or count > user.hourly_limit:
        return {550}
    if user.sent + count > user.hourly_limit:
        return {451}
    return {250}


class ApiMachine(RuleBasedStateMachine):
    server: ClassVar[ServerProcess]
    issued: ClassVar[set[str]] = set()  # every name seen in this test run, across examples
    seen: ClassVar[Counter[str]] = Counter()  # outcomes, to tell what a run exercised

    users = Bundle("users")

    def __init__(self) -> None:
        super().__init__()
        self.owners: list[Owner] = [create_owner(self.server.database_url) for _ in range(2)]
        self.model: dict[str, ModelUser] = {}  # in creation order
        self.open: OpenTransaction | None = None
        self.http = httpx.Client(base_url=self.server.base_url, timeout=30)

    def teardown(self) -> None:
        if self.open is not None:
            self.open.client.close()
        self.http.close()

    # --- helpers ---------------------------------------------------------------------------------

    def _post(self, call: str, owner: int, as_form: bool, **params: Any) -> httpx.Response:
        body = self.owners[owner].creds(**params)
        if as_form:
            response = self.http.post(f"/settings/{call}", data={k: str(v) for k, v in body.items()})
        else:
            response = self.http.post(f"/settings/{call}", json=body)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["cache-control"] == "no-store"
        return response

    def _refused_as_unknown(self, response: httpx.Response, name: str) -> None:
        """Another owner's user, a deleted one and none at all: one and the same ValidationError."""
        assert response.status_code == 400, response.text
        body = response.json()
        assert (body["status"], body["name"], body["type"]) == ("error", "ValidationError", "ValidationError")
        assert body["message"] == f"smtp_user_name {name!r} names no SMTP user of this owner"

    def _acting_owner(self, user: ModelUser, as_owner: bool) -> int:
        return user.owner if as_owner else 1 - user.owner

    def _addressable(self, user: ModelUser, owner: int) -> bool:
        return owner == user.owner and not user.deleted

    def _connect(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.server.smtp_port, timeout=30)
        client.ehlo("stateful.test")
        return client

    @staticmethod
    def _auth(client: smtplib.SMTP, mechanism: str, name: str, password: str) -> int:
        if mechanism == "PLAIN":
            blob = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
            return client.docmd("AUTH", f"PLAIN {blob}")[0]
        code, _ = client.docmd("AUTH", "LOGIN " + base64.b64encode(name.encode()).decode())
        assert code == 334
        return client.docmd(base64.b64encode(password.encode()).decode())[0]

    def _begin(self, user: ModelUser, recipients: int) -> OpenTransaction | None:
        """Log in with the current password, MAIL, and RCPT ``recipients`` times, each answered as
        the model says. None if the login is refused (as it must be) or no recipient was accepted."""
        client = self._connect()
        password = user.passwords[-1]
        code = self._auth(client, "PLAIN", user.name, password)
        if not user.may_log_in:
            assert code == 535, f"{user} logged in"
            client.close()
            return None
        assert code == 235, f"{user} could not log in: {code}"
        assert client.mail("app@example.com")[0] == 250
        accepted = 0
        for i in range(recipients):
            expected = _expected_rcpt(user, accepted)
            code, reply = client.rcpt(f"r{i}@example.net")
            assert code == expected, f"RCPT {i + 1} of {recipients} for {user}: {code} {reply!r}"
            self.seen[f"RCPT {code}"] += 1
            if code == 250:
                accepted += 1
            elif code == 550:
                assert reply.startswith(b"5.7.1 Total sending limit"), reply
            else:
                assert reply.startswith(b"4.7.1 Hourly sending limit"), reply
        if accepted == 0:
            client.quit()
            return None
        return OpenTransaction(client, user, accepted, password)

    def _finish(self, transaction: OpenTransaction) -> None:
        expected = _expected_data(transaction)
        code, reply = transaction.client.data(MESSAGE)
        assert code in expected, f"DATA for {transaction}: {code} {reply!r}, expected {expected}"
        self.seen[f"DATA {code}"] += 1
        if code == 250:
            transaction.user.sent += transaction.recipients
        transaction.client.close()

    # --- the management API ----------------------------------------------------------------------

    @rule(target=users, owner=st.integers(0, 1), total=LIMITS, hourly=LIMITS, as_form=st.booleans())
    def add_smtp(self, owner: int, total: int, hourly: int, as_form: bool) -> str:
        response = self._post("addSmtp", owner, as_form, total_limit=total, hourly_limit=hourly)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["status"], body["message"]) == ("success", "SMTP User Created")
        name, password = body["smtp_user_name"], body["smtp_password"]
        assert name.startswith("smtp") and name[4:].isdigit()
        assert name not in self.issued, f"{name} issued twice"
        assert len(password) >= 16 and password.isascii() and password.isalnum()
        self.issued.add(name)
        self.model[name] = ModelUser(name, owner, [password], total, hourly)
        return name

    @rule(
        name=users,
        as_owner=st.booleans(),
        total=LIMITS,
        hourly=st.none() | LIMITS,
        status=st.none() | STATUSES,
        as_form=st.booleans(),
    )
    def edit_smtp(
        self, name: str, as_owner: bool, total: int, hourly: int | None, status: str | None, as_form: bool
    ) -> None:
        user = self.model[name]
        owner = self._acting_owner(user, as_owner)
        params: dict[str, Any] = {"smtp_user_name": name, "total_limit": total}
        if hourly is not None:
            params["hourly_limit"] = hourly
        if status is not None:
            params["status"] = status
        response = self._post("editSmtp", owner, as_form, **params)
        if not self._addressable(user, owner):
            self._refused_as_unknown(response, name)
            return
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "success", "message": "SMTP User Updated"}
        user.total_limit = total
        user.hourly_limit = hourly if hourly is not None else user.hourly_limit
        user.status = status.capitalize() if status is not None else user.status

    @rule(name=users, as_owner=st.booleans(), as_form=st.booleans())
    def reset_password(self, name: str, as_owner: bool, as_form: bool) -> None:
        user = self.model[name]
        owner = self._acting_owner(user, as_owner)
        response = self._post("resetSmtpPassword", owner, as_form, smtp_user_name=name)
        if not self._addressable(user, owner):
            self._refused_as_unknown(response, name)
            return
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["message"], body["smtp_user_name"]) == ("password reseted", name)
        assert body["smtp_password"] not in user.passwords
        user.passwords.append(body["smtp_password"])

    @rule(name=users, as_owner=st.booleans(), as_form=st.booleans())
    def delete_smtp(self, name: str, as_owner: bool, as_form: bool) -> None:
        user = self.model[name]
        owner = self._acting_owner(user, as_owner)
        response = self._post("deleteSmtp", owner, as_form, smtp_user_name=name)
        if not self._addressable(user, owner):
            self._refused_as_unknown(response, name)
            return
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "success", "message": "SMTP User Deleted"}
        user.deleted = True

    # --- SMTP ------------------------------------------------------------------------------------

    @rule(
        name=users,
        which=st.sampled_from(["current", "older", "never issued"]),
        mechanism=st.sampled_from(["PLAIN", "LOGIN"]),
    )
    def log_in(self, name: str, which: str, mechanism: str) -> None:
        user = self.model[name]
        if which == "older" and len(user.passwords) == 1:
            which = "never issued"
        password = {
            "current": user.passwords[-1],
            "older": user.passwords[0] if len(user.passwords) > 1 else "",
            "never issued": secrets.token_urlsafe(15),
        }[which]
        client = self._connect()
        try:
            code = self._auth(client, mechanism, name, password)
        finally:
            client.close()
        works = which == "current" and user.may_log_in
        self.seen[f"AUTH {mechanism} {which} {code}"] += 1
        assert code == (235 if works else 535), (
            f"AUTH {mechanism} with the {which} password of {user}: {code}"
        )

    @rule(name=users, recipients=RECIPIENTS)
    def send(self, name: str, recipients: int) -> None:
        """A whole message: log in, MAIL, RCPT k times, DATA."""
        transaction = self._begin(self.model[name], recipients)
        if transaction is not None:
            self._finish(transaction)

    @precondition(lambda self: self.open is None)
    @rule(name=users, recipients=RECIPIENTS)
    def begin_message(self, name: str, recipients: int) -> None:
        """A message left open before DATA while other steps run: they may change its outcome."""
        self.open = self._begin(self.model[name], recipients)

    @precondition(lambda self: self.open is not None)
    @rule()
    def finish_message(self) -> None:
        assert self.open is not None
        transaction, self.open = self.open, None
        self._finish(transaction)

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def each_owner_lists_exactly_its_own_users_as_modelled(self) -> None:
        for owner in (0, 1):
            response = self._post("listSmtp", owner, False)
            assert response.status_code == 200, response.text
            listed = response.json()["smtp_list"]
            expected = [
                {
                    "smtp_user_name": user.name,
                    "smtp_password": user.passwords[-1],
                    "status": user.status,
                    "total_limit": user.total_limit,
                    "hourly_limit": user.hourly_limit,
                    "sent_total": user.sent,
                    "sent_last_hour": user.sent,
                }
                for user in self.model.values()
                if user.owner == owner and not user.deleted
            ]
            assert listed == expected


def test_the_api_and_smtp_server_behave_as_modelled(server: ServerProcess) -> None:
    machine = type("Machine", (ApiMachine,), {"server": server, "issued": set(), "seen": Counter()})
    run_state_machine_as_test(machine, settings=SETTINGS)
    print(f"stateful outcomes on {server.database_url.split(':')[0]}: {dict(sorted(machine.seen.items()))}")
