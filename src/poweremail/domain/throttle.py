"""Failed-login throttling per client address (SPEC §4: slowed, then refused for a while, and
never locking the rightful user out of its other addresses), and per SMTP user name (issue 6:
guessing one user's password from many addresses goes no faster than the configured rate)."""

from __future__ import annotations

import enum
import ipaddress
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

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


# --- failed logins per SMTP user, from whatever addresses -----------------------------------------

# Names longer than any SMTP user's (32 characters) all exist as little as each other: past this
# length they share one bucket, so that a name costs bounded memory.
_NAME_KEY_LENGTH = 64
# An address that logged in as a user is that user's for this long after its last login.
KNOWN_ADDRESS_AGE = 30 * 24 * 3600.0
KNOWN_ADDRESSES_PER_USER = 64
MAX_TRACKED_NAMES = 100_000


class Busy(enum.Enum):
    """Every failure this name has left is reserved by a check in flight: ask again when one ends
    (a right password gives its reservation back)."""

    BUSY = "busy"


BUSY: Final = Busy.BUSY


@dataclass
class LoginTicket:
    """One login attempt the user throttle let through to the password check; end it once."""

    name: str
    address: str
    charged: bool  # one of the name's failures is reserved for it
    ended: bool = False


class UserLoginThrottle:
    """Password guessing against one SMTP user from many addresses (issue 6), whatever the
    per-address throttle lets through, is held to ``max_failures`` per ``window`` on this node.

    Each login name has a token bucket of ``max_failures`` failures, refilled evenly over ``window``.
    A login from an address that is not known for that name reserves a token *before* its password
    is checked (a right password gives it back): with none left it gets no verdict at all — it is
    answered ``454 4.7.0`` unchecked — so guesses spread over many addresses, or sent all at once on
    many connections, learn nothing faster than the configured rate. (An answer that checked the
    right password while refusing the wrong ones would tell right from wrong; a delay would not hold
    against parallel connections.) While tokens are only reserved, not spent, an attempt is told
    :data:`BUSY` and waits: many sessions of the rightful user logging in at once are not refused.

    Not a lockout: an address that logged in as that name in the last 30 days is *known* and always
    checked (its failures still count, and the per-address throttle still applies to it), so the
    rightful user's usual addresses log in however hard the name is guessed at. Only a new address
    can be told 454 (a temporary reply: clients retry) while guessing lasts, and only until a
    token is back. Not an oracle: buckets belong to login *names*, existing or not; a name that
    does not exist runs out exactly like one that does, and no address is ever known for it.
    """

    def __init__(
        self,
        *,
        max_failures: int,
        window: float,
        known_address_age: float = KNOWN_ADDRESS_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = float(max_failures)
        self._refill_per_second = max_failures / window
        self._known_address_age = known_address_age
        self._clock = clock
        # name -> (tokens, when counted); only names below capacity, least recently changed first.
        # Reserved tokens are already taken out.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._reserved: Counter[str] = Counter()  # name -> checks in flight holding a token
        # name -> address key -> last login there; most recently used last, at both levels.
        self._known: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def admit(self, name: str, address: str) -> LoginTicket | Busy | None:
        """A ticket to check this attempt's password; BUSY: ask again when a check ends; None:
        answer it 454 without checking."""
        name, key, now = name[:_NAME_KEY_LENGTH], address_key(address), self._clock()
        if self._is_known(name, key, now):
            return LoginTicket(name, key, charged=False)
        tokens = self._tokens(name, now)
        if tokens >= 1:
            self._store(name, tokens - 1, now)
            self._reserved[name] += 1
            return LoginTicket(name, key, charged=True)
        return BUSY if self._reserved[name] > 0 else None

    def succeeded(self, ticket: LoginTicket) -> None:
        """The password was right: its token comes back, and the address is now known for the name."""
        if not self._end(ticket):
            return
        now = self._clock()
        if ticket.charged:
            self._store(ticket.name, self._tokens(ticket.name, now) + 1, now)
        addresses = self._known.pop(ticket.name, None) or OrderedDict()
        addresses.pop(ticket.address, None)
        addresses[ticket.address] = now
        while len(addresses) > KNOWN_ADDRESSES_PER_USER:
            addresses.popitem(last=False)
        self._known[ticket.name] = addresses
        while len(self._known) > MAX_TRACKED_NAMES:
            self._known.popitem(last=False)

    def failed(self, ticket: LoginTicket) -> None:
        """The password was wrong (or the name does not exist, or may not log in)."""
        if self._end(ticket) and not ticket.charged:  # from a known address: counted, never refused
            now = self._clock()
            self._store(ticket.name, max(self._tokens(ticket.name, now) - 1, 0.0), now)

    def unanswered(self, ticket: LoginTicket) -> None:
        """No verdict was given (the store failed, the client left): the attempt costs nothing.
        Does nothing for a ticket already ended, so it can be called whatever happened."""
        if self._end(ticket) and ticket.charged:
            now = self._clock()
            self._store(ticket.name, self._tokens(ticket.name, now) + 1, now)

    def _end(self, ticket: LoginTicket) -> bool:
        if ticket.ended:
            return False
        ticket.ended = True
        if ticket.charged:
            self._reserved[ticket.name] -= 1
            if self._reserved[ticket.name] <= 0:
                del self._reserved[ticket.name]
        return True

    def _is_known(self, name: str, key: str, now: float) -> bool:
        addresses = self._known.get(name)
        if addresses is None:
            return False
        last_login = addresses.get(key)
        if last_login is None:
            return False
        if now - last_login > self._known_address_age:
            del addresses[key]
            if not addresses:
                del self._known[name]
            return False
        return True

    def _tokens(self, name: str, now: float) -> float:
        bucket = self._buckets.get(name)
        if bucket is None:
            return self._capacity
        tokens, counted_at = bucket
        return min(self._capacity, tokens + (now - counted_at) * self._refill_per_second)

    def _store(self, name: str, tokens: float, now: float) -> None:
        self._buckets.pop(name, None)
        if tokens < self._capacity:  # a full bucket is the same as none
            self._buckets[name] = (tokens, now)
        if len(self._buckets) > MAX_TRACKED_NAMES:
            self._forget(now)

    def _forget(self, now: float) -> None:
        """Bounded memory whatever names are tried: drop buckets that have refilled, then (rarely:
        it takes that many names failing at once) the least recently changed, down to 90%."""
        for name in [n for n in self._buckets if self._tokens(n, now) >= self._capacity]:
            del self._buckets[name]
        while len(self._buckets) > MAX_TRACKED_NAMES * 9 // 10:
            self._buckets.popitem(last=False)
