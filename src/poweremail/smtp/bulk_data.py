"""How fast a node reads large messages: together, at no more than a set rate.

Issue 5: "a 25 MiB message being received does not stall other sessions". A large message costs
the node in proportion to its size: the event loop checks and unstuffs every block of it, the store
writes it ahead in parts (store/message_parts.py), the disk takes it. Read as fast as loopback
delivers it (~130 MB/s here), one upload took most of both cores and every other session waited.
So the part of each message past its first MiB (ordinary mail never gets there) is read from one
budget per node, a token bucket: however many large messages arrive at once, together they are read
at no more than ``rate`` octets a second, and their clients wait in TCP flow control meanwhile.

Measured (bench/scale.py's stall part, SQLite: 20 sessions sending 1 KB beside one session sending
25 MiB messages back to back, three runs each), the 20 sessions' p99 against the same without the
upload: 2.1x with no limit (3.6x before the blocks were checked at memchr's speed), 1.4-1.9x at
64 MiB/s, 1.26-1.36x at 32 MiB/s (the default: 256 Mbit/s, 0.8 s for a 25 MiB message; more than
one SMTP client's link usually brings).
"""

from __future__ import annotations

import time
from collections.abc import Callable

UNMETERED_OCTETS = 1024 * 1024  # of each message, read at once: the budget is for large ones only
BURST_SECONDS = 0.05  # the bucket holds this much of the rate: one block or two at a time


class BulkDataBudget:
    """A token bucket of octets, shared by the sessions of one node (one event loop)."""

    def __init__(self, *, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._rate = rate
        self._burst = rate * BURST_SECONDS
        self._clock = clock
        self._tokens = self._burst
        self._refilled_at = clock()

    def wait_for(self, octets: int) -> float:
        """Take ``octets`` just read; return how many seconds the reader should wait before reading
        on (0 while the budget lasts). Readers that overdraw it wait in turn: each one's wait
        includes what the others took before it."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now
        self._tokens -= octets
        return -self._tokens / self._rate if self._tokens < 0 else 0.0


def metered_octets(piece: int, received: int) -> int:
    """Of a ``piece`` octets long, just read, which brought the message to ``received`` octets:
    how many are past the message's first UNMETERED_OCTETS."""
    return max(0, min(piece, received - UNMETERED_OCTETS))
