"""Defects tests/api/test_schemathesis.py found, each pinned by a test of its own.

- A method no call takes was answered 405 without ``Allow`` (RFC 9110 §15.5.6 requires it).
- A NUL character in ``owner_id``, ``token`` or ``smtp_user_name`` reached PostgreSQL, which cannot
  hold one in text: ``500 GeneralError`` (SQLite simply found nobody). Now it is the parameter's
  ``ValidationError`` on both stores, as the document says.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support import Owner, ServerProcess

# Each call's required parameters, and a well-formed value for each but the owner's.
REQUIRED = {
    "addSmtp": ["owner_id", "token", "total_limit", "hourly_limit"],
    "editSmtp": ["owner_id", "token", "smtp_user_name", "total_limit"],
    "resetSmtpPassword": ["owner_id", "token", "smtp_user_name"],
    "listSmtp": ["owner_id", "token"],
    "deleteSmtp": ["owner_id", "token", "smtp_user_name"],
    "listMessages": ["owner_id", "token", "smtp_user_name"],
}
VALUES = {"smtp_user_name": "smtp1234567890", "total_limit": 5, "hourly_limit": 5}
STRINGS = ("owner_id", "token", "smtp_user_name")


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "TRACE"])
def test_a_method_no_call_takes_is_405_and_says_post(server: ServerProcess, method: str) -> None:
    response = httpx.request(method, f"{server.base_url}/settings/listSmtp")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["type"] == "ValidationError"


@pytest.mark.parametrize(
    ("call", "parameter"), [(call, p) for call, ps in REQUIRED.items() for p in ps if p in STRINGS]
)
@pytest.mark.parametrize("as_form", [False, True], ids=["json", "form"])
def test_a_nul_character_is_the_parameters_validation_error(
    server: ServerProcess, owner: Owner, call: str, parameter: str, as_form: bool
) -> None:
    params = {name: owner.creds(**VALUES)[name] for name in REQUIRED[call]}
    params[parameter] = params[parameter][:4] + "\x00x"
    if as_form:
        response = server.post(call, data={key: str(value) for key, value in params.items()})
    else:
        response = server.post(call, params)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["type"] == "ValidationError"
    assert body["message"] == f"{parameter} must not contain a NUL character"
