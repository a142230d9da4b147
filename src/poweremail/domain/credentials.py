"""How owner ids, owner tokens, SMTP user names and SMTP passwords are made and checked.

Everything random comes from :mod:`secrets` (a cryptographic source), as SPEC §2 requires.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

PASSWORD_ALPHABET = string.ascii_letters + string.digits
# SPEC §2: at least 16 characters of [A-Za-z0-9]. 20 characters give 119 bits.
PASSWORD_LENGTH = 20
# 10 digits after "smtp": a space of 9e9 names, so a random draw rarely collides even with millions
# of users; a collision is caught by the unique index and drawn again.
SMTP_USER_NAME_DIGITS = 10


def new_owner_id() -> str:
    return secrets.token_hex(12)


def new_owner_token() -> str:
    """256 random bits (issue 2), URL-safe so it can travel in a form body unescaped."""
    return secrets.token_urlsafe(32)


def hash_owner_token(token: str) -> bytes:
    """SHA-256 of the token.

    A fast hash is right here (unlike for human passwords): the token has 256 bits of entropy, so
    there is nothing for a slow hash to protect against, and every API call checks it.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def owner_token_matches(token: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_owner_token(token), stored_hash)


# Compared against when the owner does not exist, so an unknown owner costs the same time as a
# wrong token (the FastAPI template does the same with a dummy password hash).
DUMMY_TOKEN_HASH = hash_owner_token("not-a-token")


def new_smtp_user_name() -> str:
    first = secrets.choice("123456789")
    rest = "".join(secrets.choice(string.digits) for _ in range(SMTP_USER_NAME_DIGITS - 1))
    return f"smtp{first}{rest}"


def new_smtp_password() -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))
