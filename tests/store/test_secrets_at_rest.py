"""SMTP passwords are encrypted at rest and bound to their row; tokens are stored only hashed;
the key can be rotated without losing a password (SPEC §2, issue 2 "Secrets")."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.domain.credentials import new_smtp_password
from poweremail.keyring import DecryptionError, Keyring, KeyringError
from poweremail.store.schema import smtp_users
from tests.support import Owner, ServerProcess, clean_env, create_owner, poweremail, store_read, store_write


def _all_bytes_under(directory: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file())


def test_no_password_or_token_is_stored_in_plain_bytes(tmp_path: Path) -> None:
    """Every byte under the data directory of a SQLite node: database, WAL, key file. (PostgreSQL
    keeps its files elsewhere; test_stored_columns_hold_no_plaintext covers both stores.)"""
    server = ServerProcess(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'data' / 'db.sqlite3'}",
        log_path=tmp_path / "serve.log",
    ).start()  # fmt: skip
    try:
        owner = create_owner(server.database_url)
        passwords = [
            server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()["smtp_password"]
            for _ in range(3)
        ]
        stored = _all_bytes_under(server.data_dir)
    finally:
        server.stop()
    assert passwords and owner.token and stored
    for secret in [*passwords, owner.token]:
        assert secret.encode() not in stored
        assert secret.encode("utf-16-le") not in stored


def test_stored_columns_hold_no_plaintext(server: ServerProcess, owner: Owner) -> None:
    password = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()["smtp_password"]

    def dump(conn: Connection) -> list[bytes]:
        rows = (
            conn.execute(sa.text("SELECT * FROM smtp_users")).all()
            + conn.execute(sa.text("SELECT * FROM owners")).all()
        )
        return [repr(tuple(row)).encode() for row in rows]

    dumped = b"".join(store_read(server.database_url, dump))
    assert password.encode() not in dumped
    assert owner.token.encode() not in dumped


def test_a_ciphertext_moved_to_another_row_does_not_decrypt(server: ServerProcess, owner: Owner) -> None:
    first = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()["smtp_user_name"]
    second = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()["smtp_user_name"]

    def swap(conn: Connection) -> None:
        stolen = conn.scalar(sa.select(smtp_users.c.password_ciphertext).where(smtp_users.c.name == first))
        conn.execute(
            smtp_users.update().where(smtp_users.c.name == second).values(password_ciphertext=stolen)
        )

    store_write(server.database_url, swap)
    response = server.post("listSmtp", owner.creds())
    assert response.status_code == 500
    body = response.json()
    assert body["type"] == body["name"] == "GeneralError"
    assert second not in body["message"] and "decrypt" not in body["message"]  # details only in the log
    assert f"the stored password of {second} does not decrypt" in server.log()


def test_keyring_binds_ciphertexts_to_the_user_name(tmp_path: Path) -> None:
    keyring = Keyring.load_or_create(tmp_path / "secret.key")
    password = new_smtp_password()
    key_id, blob = keyring.encrypt_password(password, smtp_user_name="smtp1")
    assert keyring.decrypt_password(key_id, blob, smtp_user_name="smtp1") == password
    with pytest.raises(DecryptionError):
        keyring.decrypt_password(key_id, blob, smtp_user_name="smtp2")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(DecryptionError):
        keyring.decrypt_password(key_id, tampered, smtp_user_name="smtp1")
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert "key_ids=[1]" in repr(keyring) and "keys=" not in repr(keyring)


@pytest.mark.parametrize(
    "content", [b"", b"not json", b'{"format": "x"}', b'{"format": "poweremail-keyring-1"}']
)
def test_a_broken_key_file_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "secret.key").write_bytes(content)
    with pytest.raises(KeyringError, match="is not a valid PowerEmail keyring"):
        Keyring.load(tmp_path / "secret.key")
    result = poweremail("owner", "create", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "secret.key is not a valid PowerEmail keyring" in result.stderr


def test_keys_rotate_keeps_every_password_readable(database_url: str, tmp_path: Path) -> None:
    flags = ["--data-dir", str(tmp_path / "data"), "--database-url", database_url]
    created = poweremail("owner", "create", *flags)
    assert created.returncode == 0, created.stderr
    creds = json.loads(created.stdout)
    server = ServerProcess(
        data_dir=tmp_path / "data",
        database_url=database_url,
        log_path=tmp_path / "serve.log",
    ).start()
    try:
        owner = Owner(creds["owner_id"], creds["token"])
        for _ in range(3):
            assert server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).status_code == 200
        deleted = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()["smtp_user_name"]
        server.post("deleteSmtp", owner.creds(smtp_user_name=deleted))
        before = server.post("listSmtp", owner.creds()).json()["smtp_list"]
        old_key = Keyring.load(tmp_path / "data" / "secret.key").keys[1]

        rotated = poweremail("keys", "rotate", *flags)
        assert rotated.returncode == 0, rotated.stderr
        summary = json.loads(rotated.stdout)
        assert summary == {"primary_key_id": 2, "passwords_reencrypted": 3, "retired_key_ids": [1]}

        keyring = Keyring.load(tmp_path / "data" / "secret.key")
        assert list(keyring.keys) == [2] and keyring.keys[2] != old_key
        # The running server encrypts its next password under the new key, before any read told it
        # about the rotation; then every password, old and new, still reads.
        added = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()
        after = server.post("listSmtp", owner.creds()).json()["smtp_list"]
        assert after[:3] == before
        assert after[3]["smtp_password"] == added["smtp_password"]
    finally:
        server.stop()
    assert poweremail("keys", "rotate", *flags).returncode == 0  # again: nothing lost


def test_env_is_clean() -> None:
    assert not any(key.startswith("POWEREMAIL_") for key in clean_env())
