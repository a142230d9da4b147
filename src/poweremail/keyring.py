"""The server keys that encrypt SMTP passwords at rest (SPEC §2, issue 2 "Secrets").

``listSmtp`` must return passwords, so they are encrypted rather than hashed: AES-256-GCM, with the
SMTP user's name (unique and never reused) as associated data, so a ciphertext copied onto another
row does not decrypt. Each ciphertext records the id of the key that made it, which is what lets
``poweremail keys rotate`` move rows to a new key one by one and retire the old key only when no
row needs it, surviving a crash at any point.

The key file is a small JSON keyring::

    {"format": "poweremail-keyring-1", "primary": 2, "keys": {"1": "<base64>", "2": "<base64>"}}

It is written atomically (temporary file, fsync, rename) with mode 0600. Nodes of one cluster share
the same file; a running server re-reads it when it meets a key id it does not know, so a rotation
done on one node is picked up by the others once the file is distributed.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = "poweremail-keyring-1"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce (NIST SP 800-38D); random per encryption


class KeyringError(Exception):
    """The key file is missing, unreadable or malformed; the message says which and where."""


class DecryptionError(Exception):
    """A ciphertext does not decrypt: wrong row, unknown key, or tampering. Carries no secret."""


def _password_aad(smtp_user_name: str) -> bytes:
    return f"poweremail/smtp_user/{smtp_user_name}/password".encode()


@dataclass
class Keyring:
    path: Path
    primary: int
    keys: dict[int, bytes]
    # A serving keyring follows the file, so a rotation reaches it before its next encryption.
    # ``keys rotate`` turns this off for its final sweep, which must keep the retired keys in memory.
    follow_file: bool = True
    _loaded_stat: tuple[int, int] | None = field(default=None, repr=False)
    # One AESGCM object per key, not per row: building it cost ~16% of listSmtp for 1,000 users.
    _ciphers: dict[bytes, AESGCM] = field(default_factory=dict, repr=False)

    def _cipher(self, key: bytes) -> AESGCM:
        cipher = self._ciphers.get(key)
        if cipher is None:
            cipher = self._ciphers[key] = AESGCM(key)
        return cipher

    def __repr__(self) -> str:  # never show key material
        return f"Keyring(path={str(self.path)!r}, primary={self.primary}, key_ids={sorted(self.keys)})"

    # --- loading and saving -------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, path: Path) -> Keyring:
        """Read the keyring at ``path``, or create it with one fresh key if there is no file yet."""
        if not path.exists():
            keyring = cls(path=path, primary=1, keys={1: secrets.token_bytes(KEY_BYTES)})
            path.parent.mkdir(parents=True, exist_ok=True)
            keyring.save()
            return keyring
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            raw = path.read_bytes()
            st = path.stat()
        except OSError as exc:
            raise KeyringError(f"cannot read the secret key file {path}: {exc.strerror}") from None
        primary, keys = _parse(raw, path)
        return cls(path=path, primary=primary, keys=keys, _loaded_stat=(st.st_mtime_ns, st.st_size))

    def save(self) -> None:
        document = {
            "format": FORMAT,
            "primary": self.primary,
            "keys": {
                str(key_id): base64.b64encode(key).decode() for key_id, key in sorted(self.keys.items())
            },
        }
        data = (json.dumps(document, indent=2) + "\n").encode()
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        st = self.path.stat()
        self._loaded_stat = (st.st_mtime_ns, st.st_size)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed on disk (another node or ``keys rotate`` wrote it)."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        if (st.st_mtime_ns, st.st_size) == self._loaded_stat:
            return False
        fresh = Keyring.load(self.path)
        self.primary, self.keys, self._loaded_stat = fresh.primary, fresh.keys, fresh._loaded_stat
        return True

    # --- rotation -------------------------------------------------------------------------------

    def add_primary_key(self) -> int:
        new_id = max(self.keys) + 1
        self.keys[new_id] = secrets.token_bytes(KEY_BYTES)
        self.primary = new_id
        self.save()
        return new_id

    def retire_all_but_primary(self) -> Keyring:
        """Write the file with only the primary key; return an in-memory keyring that still holds
        every key (never saved), for a last sweep of rows written under an old key meanwhile."""
        everything = Keyring(path=self.path, primary=self.primary, keys=dict(self.keys), follow_file=False)
        self.keys = {self.primary: self.keys[self.primary]}
        self.save()
        return everything

    # --- SMTP passwords -------------------------------------------------------------------------

    def encrypt_password(self, password: str, *, smtp_user_name: str) -> tuple[int, bytes]:
        """Return ``(key_id, nonce || ciphertext)`` under the primary key."""
        if self.follow_file:
            self.reload_if_changed()  # one stat(); encryptions happen only in addSmtp and resets
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._cipher(self.keys[self.primary]).encrypt(
            nonce, password.encode(), _password_aad(smtp_user_name)
        )
        return self.primary, nonce + sealed

    def decrypt_password(self, key_id: int, blob: bytes, *, smtp_user_name: str) -> str:
        key = self.keys.get(key_id)
        if key is None and self.follow_file and self.reload_if_changed():
            key = self.keys.get(key_id)
        if key is None:
            raise DecryptionError(f"no key with id {key_id} in {self.path}")
        try:
            plain = self._cipher(key).decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], _password_aad(smtp_user_name)
            )
        except InvalidTag:
            raise DecryptionError(f"the stored password of {smtp_user_name} does not decrypt") from None
        return plain.decode()


def _parse(raw: bytes, path: Path) -> tuple[int, dict[int, bytes]]:
    try:
        document = json.loads(raw)
        if document.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        keys = {
            int(key_id): base64.b64decode(value, validate=True) for key_id, value in document["keys"].items()
        }
        primary = int(document["primary"])
        if primary not in keys:
            raise ValueError("the primary key id is not among the keys")
        if any(len(key) != KEY_BYTES for key in keys.values()):
            raise ValueError(f"every key must be {KEY_BYTES} bytes")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # The message names the problem, never the content: the file holds secrets.
        raise KeyringError(f"the secret key file {path} is not a valid PowerEmail keyring ({exc})") from None
    return primary, keys
