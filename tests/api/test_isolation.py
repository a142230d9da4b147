"""An owner sees and changes only its own SMTP users (SPEC §2), and cannot tell another's exist."""

from __future__ import annotations

import pytest

from tests.support import Owner, ServerProcess


@pytest.mark.parametrize("call", ["editSmtp", "resetSmtpPassword", "deleteSmtp"])
def test_another_owners_user_is_indistinguishable_from_a_missing_one(
    server: ServerProcess, owner: Owner, other_owner: Owner, call: str
) -> None:
    created = server.post("addSmtp", owner.creds(total_limit=100, hourly_limit=10)).json()
    theirs, missing = created["smtp_user_name"], "smtp1000000001"

    params = {"total_limit": 1, "status": "Disable"} if call == "editSmtp" else {}
    answers = [
        server.post(call, other_owner.creds(smtp_user_name=name, **params)) for name in (theirs, missing)
    ]
    assert [a.status_code for a in answers] == [400, 400]
    bodies = [a.json() for a in answers]
    assert bodies[0]["message"].replace(theirs, "X") == bodies[1]["message"].replace(missing, "X")
    assert bodies[0]["type"] == "ValidationError"

    # ...and the owner's user is untouched.
    [entry] = server.post("listSmtp", owner.creds()).json()["smtp_list"]
    assert entry["smtp_password"] == created["smtp_password"]
    assert (entry["status"], entry["total_limit"]) == ("Enable", 100)


def test_each_owner_lists_only_its_own_users(server: ServerProcess, owner: Owner, other_owner: Owner) -> None:
    mine = {
        server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()["smtp_user_name"]
        for _ in range(2)
    }
    theirs = {
        server.post("addSmtp", other_owner.creds(total_limit=5, hourly_limit=5)).json()["smtp_user_name"]
        for _ in range(3)
    }
    listed_mine = {e["smtp_user_name"] for e in server.post("listSmtp", owner.creds()).json()["smtp_list"]}
    listed_theirs = {
        e["smtp_user_name"] for e in server.post("listSmtp", other_owner.creds()).json()["smtp_list"]
    }
    assert listed_mine == mine
    assert listed_theirs == theirs


def test_one_owners_token_does_not_open_another_owner(
    server: ServerProcess, owner: Owner, other_owner: Owner
) -> None:
    response = server.post("listSmtp", {"owner_id": owner.owner_id, "token": other_owner.token})
    assert response.status_code == 401
    assert response.json()["message"] == "Token MissMatch"
