"""Hostile input against a real ``poweremail serve``: schemathesis generates requests from the API's
OpenAPI document — valid ones and, as many, invalid ones (negative data) — in its examples, coverage
and fuzzing phases, and every answer must pass every built-in check: never a ``5xx``, only documented
status codes, content types and body shapes, valid input accepted and invalid input refused, a
``405`` with ``Allow`` for a method no call takes.

Generated requests carry made-up owners, so nearly all would stop at ``401``. To get valid requests
past authentication and into the calls, ``_with_real_credentials`` puts a real owner's ``owner_id``
and ``token`` in place of well-formed generated ones (a fixed quarter of them are left as generated,
so that ``401`` is checked too) and a real SMTP user of that owner in place of a well-formed
``smtp_user_name``. Values the document forbids (a number, an empty string, a missing field) are
never replaced: those are the negative data. Each operation must get enough requests through to a
``200`` (checked when its test ends), or the run would prove little.

One thing the document cannot say: JSON Schema counts ``5.0`` as an integer, while the API takes
an integer only as written (SPEC §2: "a JSON integer"; the document's description says so). A number
written so must be refused with ``400``, and is exempt from "valid data is accepted" alone.

The schema is built in-process, as the server builds it (``schemathesis.pytest.from_fixture`` fails
on pytest 9.2, which no longer has ``Node._nodeid``), and ``test_the_server_serves_the_document_under_test``
holds it to the document the server serves. A deeper run, with new inputs each time:
``POWEREMAIL_TEST_FUZZ_RANDOM=1 POWEREMAIL_TEST_FUZZ_EXAMPLES=400 pytest tests/api/test_schemathesis.py``.
"""

from __future__ import annotations

import copy
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case

from poweremail.api.app import create_app
from poweremail.services import Services
from tests.smtp.helpers import SmtpUser, add_smtp_user, logged_in
from tests.support import Owner, ServerProcess, create_owner

# Per operation and backend, in the fuzzing phase; the examples and coverage phases add their own.
MAX_EXAMPLES = int(os.environ.get("POWEREMAIL_TEST_FUZZ_EXAMPLES", "60"))
MIN_ACCEPTED = 10  # requests per operation and backend that must get through to a 200

CONFIG: dict[str, Any] = {
    # Valid and invalid inputs. Deterministic, so CI meets the same inputs every run (set
    # POWEREMAIL_TEST_FUZZ_RANDOM for new ones); no example database is written into the working tree.
    "generation": {
        "mode": "all",
        "max-examples": MAX_EXAMPLES,
        "deterministic": "POWEREMAIL_TEST_FUZZ_RANDOM" not in os.environ,
        "database": "none",
    },
    # Every phase for single requests. The "stateful" phase needs OpenAPI links, which this API has
    # none of; tests/api/test_stateful.py drives sequences of calls.
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
    "request-timeout": 30,
}


def _document() -> dict[str, Any]:
    """The OpenAPI document as the server builds it (describing itself, the app touches no service)."""
    return create_app(cast(Services, None)).openapi()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT), config=schemathesis.Config.from_dict(CONFIG))


def _well_formed(value: object) -> bool:
    """A value the document allows for ``owner_id``, ``token`` and ``smtp_user_name``."""
    return isinstance(value, str) and 1 <= len(value) <= 256 and "\x00" not in value


def _left_as_generated(value: str) -> bool:
    """A fixed quarter of the well-formed credentials stay as generated, to exercise ``401``."""
    return zlib.crc32(value.encode("utf-8", "surrogatepass")) % 4 == 0


@dataclass
class RealAccount:
    """A real owner, with an SMTP user that has sent mail (listMessages has rows to show)."""

    server: ServerProcess
    owner: Owner
    standing: SmtpUser
    # (phase, mode, HTTP status) -> requests
    tally: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    def fresh_user(self) -> str:
        return add_smtp_user(self.server, self.owner).name


@pytest.fixture
def account(server: ServerProcess, request: pytest.FixtureRequest) -> Iterator[RealAccount]:
    owner = create_owner(server.database_url)
    standing = add_smtp_user(server, owner)
    with logged_in(server, standing) as client:
        client.sendmail(
            "app@example.com", ["a@example.net", "b@example.org"], b"Subject: hi\r\n\r\nHello.\r\n"
        )
        client.sendmail("", ["c@example.net"], b"Subject: null sender\r\n\r\nHello.\r\n")
    account = RealAccount(server, owner, standing)
    yield account
    request.node.user_properties.append(("schemathesis_tally", dict(account.tally)))
    accepted = sum(count for (_, _, status), count in account.tally.items() if status == 200)
    assert accepted >= MIN_ACCEPTED, f"only {accepted} requests got through to a 200: {account.tally}"


def _with_real_credentials(case: Case, account: RealAccount) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    for key, real in (("owner_id", account.owner.owner_id), ("token", account.owner.token)):
        value = body.get(key)
        if _well_formed(value) and not _left_as_generated(value):
            body[key] = real
    if _well_formed(body.get("smtp_user_name")):
        # deleteSmtp gets a user of its own each time; the other calls share one that stays.
        deleting = case.operation.path.endswith("/deleteSmtp")
        body["smtp_user_name"] = account.fresh_user() if deleting else account.standing.name


def _written_as_float(case: Case) -> bool:
    """Whether a number parameter is a JSON number with a fraction or exponent, such as ``5.0``."""
    body = case.body
    return isinstance(body, dict) and any(
        isinstance(body.get(key), float) for key in ("total_limit", "hourly_limit", "limit", "offset")
    )


# ``account`` is shared by one operation's inputs on purpose: it is the real owner they all act as.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@schema.parametrize()
def test_every_answer_is_documented_and_never_a_server_error(
    case: Case, account: RealAccount, server: ServerProcess
) -> None:
    _with_real_credentials(case, account)
    response = case.call(base_url=server.base_url)
    if case.meta is not None:
        account.tally[case.meta.phase.name.value, case.meta.generation.mode.value, response.status_code] += 1
    excluded = []
    if _written_as_float(case):
        # The one thing the document cannot say: JSON Schema counts 5.0 as an integer, the API takes
        # integers only as written (SPEC §2: "a JSON integer"; the document's description says so).
        assert response.status_code == 400, response.text
        excluded.append(schemathesis.checks.positive_data_acceptance)
    case.validate_response(response, excluded_checks=excluded, transport_kwargs={"base_url": server.base_url})


def test_the_server_serves_the_document_under_test(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/openapi.json").json() == DOCUMENT
