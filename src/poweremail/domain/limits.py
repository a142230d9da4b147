"""Sending limits (SPEC §2 parameter types, §3 semantics)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

# SPEC §2: whole numbers from 1 to 2,147,483,647 (a signed 32-bit integer, so every store holds it).
MIN_LIMIT = 1
MAX_LIMIT = 2_147_483_647
LIMIT_RULE = f"must be a whole number from {MIN_LIMIT} to {MAX_LIMIT}"


def parse_whole_number(value: object, *, minimum: int, maximum: int) -> int:
    """A JSON integer or a string of ASCII digits from ``minimum`` to ``maximum``; anything else
    raises ``ValueError`` saying the rule.

    Booleans are refused although ``bool`` is an ``int`` in Python; so are floats, even ``5.0``,
    and strings with signs, spaces or non-ASCII digits (``str.isdigit`` accepts "²").
    """
    rule = f"must be a whole number from {minimum} to {maximum}"
    if isinstance(value, bool):
        raise ValueError(rule)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        # Leading zeros are fine ("007"), however many: int() refuses more than 4,300 digits.
        digits = value.lstrip("0")
        number = int(digits or "0") if len(digits) <= len(str(maximum)) else maximum + 1
    else:
        raise ValueError(rule)
    if not minimum <= number <= maximum:
        raise ValueError(rule)
    return number


def parse_limit(value: object) -> int:
    """A ``total_limit`` or ``hourly_limit`` (SPEC §2)."""
    return parse_whole_number(value, minimum=MIN_LIMIT, maximum=MAX_LIMIT)


# --- SPEC §3: what sending costs and when it is refused ----------------------------------------

HOURLY_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class Usage:
    """Recipients an SMTP user has sent: over its life, and within the rolling hour."""

    sent_total: int
    sent_last_hour: int

    def plus(self, recipients: int) -> Usage:
        """This usage with ``recipients`` more sent now: how an SMTP transaction's accepted
        recipients count while it checks the next one (they will be sent together)."""
        return Usage(self.sent_total + recipients, self.sent_last_hour + recipients)


@dataclass(frozen=True)
class Limits:
    total_limit: int
    hourly_limit: int


@dataclass(frozen=True)
class OverLimit:
    """Why ``recipients`` more cannot be sent now."""

    which: Literal["total", "hourly"]
    limit: int  # the limit that refused, as it stood when checked
    # Hourly: how many recipients sent within the hour must expire before these fit; 0 if they
    # never fit (more recipients in one message than the hourly limit).
    excess: int = 0
    # Hourly: when that will be; filled in by the store, which knows when each was sent.
    resume_at: datetime | None = None


def check_limits(*, limits: Limits, usage: Usage, recipients: int) -> OverLimit | None:
    """``None`` if ``recipients`` more fit both limits, else which limit they break.

    A limit counts recipients (SPEC §3). The total limit is checked first: it is the permanent one.
    """
    if usage.sent_total + recipients > limits.total_limit:
        return OverLimit("total", limits.total_limit)
    excess = usage.sent_last_hour + recipients - limits.hourly_limit
    if excess <= 0:
        return None
    if recipients > limits.hourly_limit:
        return OverLimit("hourly", limits.hourly_limit, excess=0)
    return OverLimit("hourly", limits.hourly_limit, excess=excess)
