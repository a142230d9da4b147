"""The document's example requests, sent verbatim, succeed with the documented answers."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from sqlalchemy import Connection

from poweremail.domain.credentials import hash_owner_token
from poweremail.keyring import Keyring
from poweremail.store.schema import owners, smtp_users
from tests.api import document_examples as doc
from tests.support import ServerProcess, store_write


def _install_document_owner(server: ServerProcess) -> None:
    """The owner "example id"/"example token" and its user "smtp12345", as the document assumes."""
    keyring = Keyring.load(server.data_dir / "secret.key")
    now = datetime.now(UTC)

    def install(conn: Connection) -> None:
        owner_pk = conn.execute(
            owners.insert()
            .values(owner_id="example id", token_sha256=hash_owner_token("example token"), created_at=now)
            .returning(owners.c.id)
        ).scalar_one()
        key_id, ciphertext = keyring.encrypt_password("asfsf4w343asfsf4w343", smtp_user_name="smtp12345")
        conn.execute(
            smtp_users.insert().values(
                name="smtp12345",
                owner_pk=owner_pk,
                password_ciphertext=ciphertext,
                password_key_id=key_id,
                status="Enable",
                total_limit=100,
                hourly_limit=10,
                created_at=now,
                updated_at=now,
            )
        )

    store_write(server.database_url, install)


def _post_verbatim(server: ServerProcess, call: str, body: str) -> httpx.Response:
    response = httpx.post(
        f"{server.base_url}/settings/{call}",
        content=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    return response


def test_the_documents_four_examples_succeed_as_printed(server: ServerProcess) -> None:
    _install_document_owner(server)

    added = _post_verbatim(server, "addSmtp", doc.ADD_SMTP)
    assert added.status_code == 200, added.text
    assert added.json()["status"] == "success"
    assert added.json()["message"] == "SMTP User Created"
    new_name = added.json()["smtp_user_name"]

    edited = _post_verbatim(server, "editSmtp", doc.EDIT_SMTP)
    assert edited.status_code == 200, edited.text
    assert edited.json() == {"status": "success", "message": "SMTP User Updated"}

    reset = _post_verbatim(server, "resetSmtpPassword", doc.RESET_SMTP_PASSWORD)
    assert reset.status_code == 200, reset.text
    assert reset.json()["message"] == "password reseted"
    assert reset.json()["smtp_user_name"] == "smtp12345"
    assert reset.json()["smtp_password"] != "asfsf4w343asfsf4w343"

    listed = _post_verbatim(server, "listSmtp", doc.LIST_SMTP)
    assert listed.status_code == 200, listed.text
    users = {entry["smtp_user_name"]: entry for entry in listed.json()["smtp_list"]}
    assert list(users) == ["smtp12345", new_name]  # oldest first
    assert users["smtp12345"] == {
        "smtp_user_name": "smtp12345",
        "smtp_password": reset.json()["smtp_password"],
        "status": "Disable",
        "total_limit": 80,
        "hourly_limit": 15,
        "sent_total": 0,
        "sent_last_hour": 0,
    }
    assert users[new_name]["smtp_password"] == added.json()["smtp_password"]
    assert (users[new_name]["total_limit"], users[new_name]["hourly_limit"]) == (100, 10)
