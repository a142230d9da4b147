"""No owner token or SMTP password appears in any log line, at any level (issue 2 "Secrets")."""

from __future__ import annotations

import base64
import contextlib
import smtplib
from pathlib import Path

from poweremail.store.schema import smtp_users
from tests.support import Owner, ServerProcess, create_owner, store_write


def test_no_secret_reaches_the_log_at_debug_level(database_url: str, tmp_path: Path) -> None:
    server = ServerProcess(
        data_dir=tmp_path / "data",
        database_url=database_url,
        log_path=tmp_path / "serve.log",
        extra_args=("--log-level", "DEBUG"),
    ).start()
    secrets: list[str] = []
    try:
        owner: Owner = create_owner(database_url)
        secrets.append(owner.token)
        created = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()
        name = created["smtp_user_name"]
        secrets.append(created["smtp_password"])
        server.post("editSmtp", owner.creds(smtp_user_name=name, total_limit=9, status="Disable"))
        secrets.append(
            server.post("resetSmtpPassword", owner.creds(smtp_user_name=name)).json()["smtp_password"]
        )
        server.post("listSmtp", owner.creds())
        server.post("editSmtp", owner.creds(smtp_user_name=name, total_limit=9, status="Enable"))
        _smtp_logins(server, name, secrets[-1])
        # Failures log more: a wrong token, a bad parameter, an unexpected error, an unknown path.
        server.post("listSmtp", {"owner_id": owner.owner_id, "token": owner.token + "-wrong"})
        server.post("addSmtp", owner.creds(total_limit="bad", hourly_limit=owner.token))
        server.post("listSmtp", data={"owner_id": owner.owner_id, "token": owner.token, "extra": owner.token})
        server.post(f"nothing?token={owner.token}", {})
        _corrupt_ciphertext(database_url, name)
        assert server.post("listSmtp", owner.creds()).status_code == 500
        server.post("deleteSmtp", owner.creds(smtp_user_name=name))
    finally:
        server.stop()
    log = server.log()
    assert " DEBUG " in log and "failed unexpectedly" in log  # the log really is verbose, errors included
    smtp_password = secrets[-1]
    # SMTP credentials travel base64-encoded: AUTH PLAIN's blob, AUTH LOGIN's password line.
    secrets += [
        base64.b64encode(f"\0{name}\0{smtp_password}".encode()).decode(),
        base64.b64encode(smtp_password.encode()).decode(),
    ]
    for secret in secrets:
        assert secret not in log


def _corrupt_ciphertext(database_url: str, name: str) -> None:
    store_write(
        database_url,
        lambda conn: conn.execute(
            smtp_users.update().where(smtp_users.c.name == name).values(password_ciphertext=b"\0" * 40)
        ),
    )


def _smtp_logins(server: ServerProcess, name: str, password: str) -> None:
    """Successful and failed logins with both mechanisms, and a message, over the SMTP server."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.login(name, password)  # smtplib picks PLAIN
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.ehlo()
        client.user, client.password = name, password
        client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    for mechanism in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
            client.ehlo()
            client.user, client.password = name, password + "-wrong"
            method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            with contextlib.suppress(smtplib.SMTPAuthenticationError):
                client.auth(mechanism, method)
