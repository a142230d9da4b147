"""Sending limits (SPEC §2 parameter types, §3 semantics)."""

from __future__ import annotations

# SPEC §2: whole numbers from 1 to 2,147,483,647 (a signed 32-bit integer, so every store holds it).
MIN_LIMIT = 1
MAX_LIMIT = 2_147_483_647
LIMIT_RULE = f"must be a whole number from {MIN_LIMIT} to {MAX_LIMIT}"


def parse_limit(value: object) -> int:
    """A JSON integer or a string of ASCII digits, in range; anything else raises ``ValueError``.

    Booleans are refused although ``bool`` is an ``int`` in Python; so are floats, even ``5.0``,
    and strings with signs, spaces or non-ASCII digits (``str.isdigit`` accepts "²").
    """
    if isinstance(value, bool):
        raise ValueError(LIMIT_RULE)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    else:
        raise ValueError(LIMIT_RULE)
    if not MIN_LIMIT <= number <= MAX_LIMIT:
        raise ValueError(LIMIT_RULE)
    return number
