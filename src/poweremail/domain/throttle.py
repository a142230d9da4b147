"""Failed-login throttling per client address (SPEC §4: slowed, then refused for a while, and
never locking the rightful user out of its other addresses)."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable

# IPv6 clients usually own a whole /64; counting per address would let one attacker rotate freely.
IPV6_PREFIX = 64
# Bounded memory whatever the number of attacking addresses: the least recently seen are dropped.
MAX_TRACKED_ADDRESSES = 100_000


def address_key(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class FailedLoginThrottle:
    def __init__(
        self,
        *,
        max_failures: int,
        window: float,
        block: float,
        delay_per_failure: float,
        max_delay: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_failures = max_failures
        self._window = window
        self._block = block
        self._delay_per_failure = delay_per_failure
        self._max_delay = max_delay
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: dict[str, float] = {}

    def is_blocked(self, address: str) -> bool:
        key = address_key(address)
        until = self._blocked_until.get(key)
        if until is None:
            return False
        if self._clock() >= until:
            del self._blocked_until[key]
            return False
        return True

    def record_failure(self, address: str) -> float:
        """Count a failure; return how long to wait before answering it (the slow-down)."""
        key, now = address_key(address), self._clock()
        failures = self._failures.pop(key, None) or deque()
        failures.append(now)
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        if len(failures) >= self._max_failures:
            self._blocked_until[key] = now + self._block
            failures.clear()
        else:
            self._failures[key] = failures  # re-inserted last: most recently seen
            while len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        if len(self._blocked_until) > MAX_TRACKED_ADDRESSES:
            self._blocked_until = {k: t for k, t in self._blocked_until.items() if t > now}
        return min(self._delay_per_failure * max(len(failures), 1), self._max_delay)
