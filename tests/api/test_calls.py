"""Each call of SPEC §2: success fields, checking order, every parameter missing or wrong."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from poweremail.api.routes import LIST_AT_ONCE
from tests.support import Owner, ServerProcess

CALL_REQUIRED = {
    "addSmtp": ["owner_id", "token", "total_limit", "hourly_limit"],
    "editSmtp": ["owner_id", "token", "smtp_user_name", "total_limit"],
    "resetSmtpPassword": ["owner_id", "token", "smtp_user_name"],
    "listSmtp": ["owner_id", "token"],
    "deleteSmtp": ["owner_id", "token", "smtp_user_name"],
}
BAD_LIMITS = [0, -5, 1.5, "abc", True, None, 2147483648, "", "1.5", " 5", "+5", "٣", [5], {"n": 5}]


def _error(response: httpx.Response, type_name: str, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error"
    assert body["code"] == "-1"
    assert body["name"] == body["type"] == type_name
    assert response.headers["cache-control"] == "no-store"
    return str(body["message"])


def _add(server: ServerProcess, owner: Owner, total: Any = 100, hourly: Any = 10) -> dict[str, Any]:
    response = server.post("addSmtp", owner.creds(total_limit=total, hourly_limit=hourly))
    assert response.status_code == 200, response.text
    return dict(response.json())


def _list(server: ServerProcess, owner: Owner) -> list[dict[str, Any]]:
    response = server.post("listSmtp", owner.creds())
    assert response.status_code == 200, response.text
    return list(response.json()["smtp_list"])


def _params_for(call: str, owner: Owner, smtp_user_name: str) -> dict[str, Any]:
    values = {**owner.creds(), "smtp_user_name": smtp_user_name, "total_limit": 50, "hourly_limit": 5}
    return {name: values[name] for name in CALL_REQUIRED[call]}


# --- success ------------------------------------------------------------------------------------


def test_add_smtp_creates_an_enabled_user_with_a_strong_password(server: ServerProcess, owner: Owner) -> None:
    created = _add(server, owner, total=100, hourly=10)
    assert created["status"] == "success"
    assert created["message"] == "SMTP User Created"
    name, password = created["smtp_user_name"], created["smtp_password"]
    assert name.startswith("smtp") and name[4:].isdigit()
    assert len(password) >= 16 and password.isascii() and password.isalnum()
    [entry] = _list(server, owner)
    assert entry == {
        "smtp_user_name": name,
        "smtp_password": password,
        "status": "Enable",
        "total_limit": 100,
        "hourly_limit": 10,
        "sent_total": 0,
        "sent_last_hour": 0,
    }


def test_limits_given_as_digit_strings_are_accepted(server: ServerProcess, owner: Owner) -> None:
    _add(server, owner, total="2147483647", hourly="1")
    [entry] = _list(server, owner)
    assert (entry["total_limit"], entry["hourly_limit"]) == (2147483647, 1)


def test_edit_smtp_changes_only_what_is_given(server: ServerProcess, owner: Owner) -> None:
    name = _add(server, owner, total=100, hourly=10)["smtp_user_name"]
    response = server.post("editSmtp", owner.creds(smtp_user_name=name, total_limit=80))
    assert response.json() == {"status": "success", "message": "SMTP User Updated"}
    [entry] = _list(server, owner)
    assert (entry["total_limit"], entry["hourly_limit"], entry["status"]) == (80, 10, "Enable")

    server.post(
        "editSmtp", owner.creds(smtp_user_name=name, total_limit=80, hourly_limit=15, status="dISABLE")
    )
    [entry] = _list(server, owner)
    assert (entry["total_limit"], entry["hourly_limit"], entry["status"]) == (80, 15, "Disable")

    server.post("editSmtp", owner.creds(smtp_user_name=name, total_limit=81, status="enable"))
    [entry] = _list(server, owner)
    assert (entry["total_limit"], entry["hourly_limit"], entry["status"]) == (81, 15, "Enable")


def test_reset_issues_a_new_password(server: ServerProcess, owner: Owner) -> None:
    created = _add(server, owner)
    response = server.post("resetSmtpPassword", owner.creds(smtp_user_name=created["smtp_user_name"]))
    body = response.json()
    assert body["status"] == "success" and body["message"] == "password reseted"
    assert body["smtp_user_name"] == created["smtp_user_name"]
    assert body["smtp_password"] != created["smtp_password"]
    assert len(body["smtp_password"]) >= 16
    [entry] = _list(server, owner)
    assert entry["smtp_password"] == body["smtp_password"]


def test_delete_removes_the_user_and_its_name_is_gone(server: ServerProcess, owner: Owner) -> None:
    keep = _add(server, owner)["smtp_user_name"]
    gone = _add(server, owner)["smtp_user_name"]
    response = server.post("deleteSmtp", owner.creds(smtp_user_name=gone))
    assert response.json() == {"status": "success", "message": "SMTP User Deleted"}
    assert [entry["smtp_user_name"] for entry in _list(server, owner)] == [keep]
    for call in ("editSmtp", "resetSmtpPassword", "deleteSmtp"):
        message = _error(server.post(call, _params_for(call, owner, gone)), "ValidationError", 400)
        assert "smtp_user_name" in message


def test_list_is_oldest_first_and_counts_in_its_message(server: ServerProcess, owner: Owner) -> None:
    names = [_add(server, owner)["smtp_user_name"] for _ in range(3)]
    response = server.post("listSmtp", owner.creds())
    assert response.json()["status"] == "success"
    assert response.json()["message"] == "3 SMTP users"
    assert [entry["smtp_user_name"] for entry in response.json()["smtp_list"]] == names


def test_an_owner_with_more_users_than_are_read_at_once_gets_them_all(
    server: ServerProcess, owner: Owner
) -> None:
    """listSmtp reads up to LIST_AT_ONCE users on the event loop; past that, in a thread. Both the
    first call (which finds out) and the next (which goes to the thread at once) list everyone."""
    names = [_add(server, owner)["smtp_user_name"] for _ in range(LIST_AT_ONCE + 1)]
    for _ in range(2):
        response = server.post("listSmtp", owner.creds())
        assert response.json()["message"] == f"{LIST_AT_ONCE + 1} SMTP users"
        assert [entry["smtp_user_name"] for entry in response.json()["smtp_list"]] == names
    server.post("deleteSmtp", owner.creds(smtp_user_name=names[0]))
    assert [entry["smtp_user_name"] for entry in _list(server, owner)] == names[1:]


def test_form_encoded_bodies_work_for_every_call(server: ServerProcess, owner: Owner) -> None:
    created = server.post("addSmtp", data=owner.creds(total_limit="7", hourly_limit="3"))
    assert created.status_code == 200, created.text
    name = created.json()["smtp_user_name"]
    edited = server.post("editSmtp", data=owner.creds(smtp_user_name=name, total_limit="9", status="Disable"))
    assert edited.status_code == 200, edited.text
    reset = server.post("resetSmtpPassword", data=owner.creds(smtp_user_name=name))
    assert reset.status_code == 200, reset.text
    listed = server.post("listSmtp", data=owner.creds())
    assert listed.json()["smtp_list"][0]["total_limit"] == 9
    assert listed.json()["smtp_list"][0]["status"] == "Disable"
    assert server.post("deleteSmtp", data=owner.creds(smtp_user_name=name)).status_code == 200


def test_json_sent_with_curls_default_form_content_type_is_read_as_json(
    server: ServerProcess, owner: Owner
) -> None:
    body = (
        f'{{"owner_id": "{owner.owner_id}", "token": "{owner.token}", "total_limit": 5, "hourly_limit": 5,}}'
    )
    response = httpx.post(
        f"{server.base_url}/settings/addSmtp",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", list(CALL_REQUIRED))
def test_wrong_token_and_unknown_owner_are_the_same_authentication_error(
    server: ServerProcess, owner: Owner, call: str
) -> None:
    params = _params_for(call, owner, "smtp1234567890")
    wrong_token = _error(
        server.post(call, {**params, "token": owner.token + "x"}), "AuthenticationError", 401
    )
    unknown = _error(server.post(call, {**params, "owner_id": "nobody"}), "AuthenticationError", 401)
    assert wrong_token == unknown == "Token MissMatch"


@pytest.mark.parametrize(("call", "missing"), [(c, p) for c, ps in CALL_REQUIRED.items() for p in ps])
def test_each_missing_parameter_is_named(
    server: ServerProcess, owner: Owner, call: str, missing: str
) -> None:
    params = _params_for(call, owner, "smtp1234567890")
    del params[missing]
    message = _error(server.post(call, params), "ValidationError", 400)
    assert message == f"{missing} is required"


@pytest.mark.parametrize("call", ["addSmtp", "editSmtp"])
@pytest.mark.parametrize("parameter", ["total_limit", "hourly_limit"])
@pytest.mark.parametrize("value", BAD_LIMITS, ids=repr)
def test_each_bad_limit_is_refused_and_named(
    server: ServerProcess, owner: Owner, call: str, parameter: str, value: Any
) -> None:
    name = _add(server, owner, total=100, hourly=10)["smtp_user_name"]
    params = {**_params_for("editSmtp", owner, name), "hourly_limit": 5, parameter: value}
    if call == "addSmtp":
        del params["smtp_user_name"]
    message = _error(server.post(call, params), "ValidationError", 400)
    assert message.startswith(f"{parameter} ")
    [entry] = _list(server, owner)
    assert (entry["total_limit"], entry["hourly_limit"]) == (100, 10)  # nothing changed


@pytest.mark.parametrize(
    ("call", "parameter"),
    [(c, p) for c, ps in CALL_REQUIRED.items() for p in ps if p in ("owner_id", "token", "smtp_user_name")],
)
@pytest.mark.parametrize("value", ["", 5, None, True, ["x"]], ids=repr)
def test_each_bad_string_is_refused_and_named(
    server: ServerProcess, owner: Owner, call: str, parameter: str, value: Any
) -> None:
    params = _params_for(call, owner, "smtp1234567890")
    message = _error(server.post(call, {**params, parameter: value}), "ValidationError", 400)
    assert message.startswith(f"{parameter} ")


@pytest.mark.parametrize("status", ["Enabled", "on", "", 1, None, True])
def test_bad_status_is_refused(server: ServerProcess, owner: Owner, status: Any) -> None:
    name = _add(server, owner)["smtp_user_name"]
    response = server.post("editSmtp", owner.creds(smtp_user_name=name, total_limit=5, status=status))
    assert _error(response, "ValidationError", 400).startswith("status ")
    assert _list(server, owner)[0]["status"] == "Enable"


@pytest.mark.parametrize("call", list(CALL_REQUIRED))
def test_an_unknown_parameter_is_named(server: ServerProcess, owner: Owner, call: str) -> None:
    params = {**_params_for(call, owner, "smtp1234567890"), "hourly_limt": 5}
    message = _error(server.post(call, params), "ValidationError", 400)
    assert "unknown parameter hourly_limt" in message


def test_parameters_a_call_does_not_document_cannot_be_set(server: ServerProcess, owner: Owner) -> None:
    response = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5, status="Disable"))
    assert _error(response, "ValidationError", 400) == "unknown parameter status"
    response = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5, smtp_user_name="smtp1"))
    assert _error(response, "ValidationError", 400) == "unknown parameter smtp_user_name"
    assert _list(server, owner) == []


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"", "application/json", "request body is empty"),
        (b"   \n", "application/json", "request body is empty"),
        (b"{not json", "application/json", "request body is not valid JSON: Expecting property name"),
        (b'{"owner_id": "a" "token": "b"}', "application/json", "line 1 column 18"),
        (b"[1, 2]", "application/json", "must be a JSON object of parameters, not a list"),
        (b'"hello"', "application/json", "not a string"),
        (b"null", "application/json", "not null"),
        (b'{"owner_id": NaN}', "application/json", "NaN is not valid JSON"),
        (b'{"owner_id": "a", "owner_id": "b"}', "application/json", "owner_id is given more than once"),
        (b"owner_id=a&owner_id=b", "application/x-www-form-urlencoded", "owner_id is given more than once"),
        (b"\xff\xfe", "application/json", "not valid UTF-8"),
        (b"[" * 60_000, "application/json", "not valid JSON"),
        (b"x" * (64 * 1024 + 1), "application/json", "larger than"),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_bodies_that_do_not_parse_say_where(
    server: ServerProcess, body: bytes, content_type: str, expected: str
) -> None:
    response = httpx.post(
        f"{server.base_url}/settings/addSmtp", content=body, headers={"Content-Type": content_type}
    )
    assert expected in _error(response, "ValidationError", 400)


def test_checking_order_parse_then_parameters_then_owner(server: ServerProcess, owner: Owner) -> None:
    # A bad parameter is reported before a bad token; a bad token before an unknown SMTP user.
    bad_both = {"owner_id": owner.owner_id, "token": "wrong", "total_limit": 0, "hourly_limit": 1}
    assert _error(server.post("addSmtp", bad_both), "ValidationError", 400).startswith("total_limit")
    bad_owner = {"owner_id": owner.owner_id, "token": "wrong", "smtp_user_name": "smtp9", "total_limit": 1}
    _error(server.post("editSmtp", bad_owner), "AuthenticationError", 401)


def test_unknown_calls_and_methods_answer_in_the_error_shape(server: ServerProcess) -> None:
    assert "no call" in _error(
        httpx.post(f"{server.base_url}/settings/nope", json={}), "ValidationError", 404
    )
    assert "POST" in _error(httpx.get(f"{server.base_url}/settings/listSmtp"), "ValidationError", 405)
