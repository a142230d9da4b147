"""The failed-login throttles: per address (IPv6 per /64), slowed, then blocked for a while; per
SMTP user name, whatever the addresses, at the configured rate without locking out known addresses."""

from __future__ import annotations

import pytest

from poweremail.domain import throttle as throttle_module
from poweremail.domain.throttle import BUSY, FailedLoginThrottle, LoginTicket, UserLoginThrottle, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(clock: Clock) -> FailedLoginThrottle:
    return FailedLoginThrottle(
        max_failures=3, window=60, block=300, delay_per_failure=0.5, max_delay=1.2, clock=clock
    )


def test_failures_slow_then_block_only_that_address() -> None:
    clock = Clock()
    throttle = _throttle(clock)
    assert [throttle.record_failure("192.0.2.1") for _ in range(2)] == [0.5, 1.0]
    assert not throttle.is_blocked("192.0.2.1")
    throttle.record_failure("192.0.2.1")
    assert throttle.is_blocked("192.0.2.1")
    assert not throttle.is_blocked("192.0.2.2")
    clock.now += 299
    assert throttle.is_blocked("192.0.2.1")
    clock.now += 2
    assert not throttle.is_blocked("192.0.2.1")


def test_old_failures_leave_the_window() -> None:
    clock = Clock()
    throttle = _throttle(clock)
    throttle.record_failure("192.0.2.1")
    throttle.record_failure("192.0.2.1")
    clock.now += 61
    assert throttle.record_failure("192.0.2.1") == 0.5
    assert not throttle.is_blocked("192.0.2.1")


def test_the_delay_is_capped() -> None:
    throttle = FailedLoginThrottle(max_failures=100, window=60, block=1, delay_per_failure=0.5, max_delay=1.2)
    assert max(throttle.record_failure("192.0.2.9") for _ in range(10)) == 1.2


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"


# --- per SMTP user name ------------------------------------------------------------------------


def _user_throttle(clock: Clock) -> UserLoginThrottle:
    return UserLoginThrottle(max_failures=3, window=30, clock=clock)  # a burst of 3, then one per 10 s


def _ticket(throttle: UserLoginThrottle, name: str, address: str) -> LoginTicket:
    ticket = throttle.admit(name, address)
    assert isinstance(ticket, LoginTicket)
    return ticket


def _guess(throttle: UserLoginThrottle, name: str, address: str) -> bool:
    """One wrong password: True if it was checked (a verdict), False if answered 454 unchecked."""
    ticket = throttle.admit(name, address)
    if ticket is None:
        return False
    assert isinstance(ticket, LoginTicket)
    throttle.failed(ticket)
    return True


def test_guessing_one_name_from_many_addresses_runs_at_the_configured_rate() -> None:
    clock = Clock()
    throttle = _user_throttle(clock)
    checked = [_guess(throttle, "smtp1", f"192.0.2.{n}") for n in range(1, 11)]
    assert checked == [True] * 3 + [False] * 7  # the burst, then nothing from anywhere
    clock.now += 9.9
    assert not _guess(throttle, "smtp1", "198.51.100.1")
    clock.now += 0.1
    assert _guess(throttle, "smtp1", "198.51.100.2")  # one every 10 s
    assert not _guess(throttle, "smtp1", "198.51.100.3")
    assert _guess(throttle, "smtp2", "198.51.100.3")  # another name has its own failures


def test_a_right_password_gives_its_token_back_and_makes_the_address_known() -> None:
    clock = Clock()
    throttle = _user_throttle(clock)
    for _ in range(5):
        throttle.succeeded(_ticket(throttle, "smtp1", "192.0.2.1"))  # logging in costs nothing
    assert [_guess(throttle, "smtp1", f"198.51.100.{n}") for n in range(1, 5)] == [True] * 3 + [False]
    # The name's failures are spent: a new address is not checked, right password or not...
    assert throttle.admit("smtp1", "203.0.113.9") is None
    # ...but the address the user logged in from is, every time.
    for _ in range(20):  # even its failures are checked (the per-address throttle limits them)
        throttle.failed(_ticket(throttle, "smtp1", "192.0.2.1"))
    throttle.succeeded(_ticket(throttle, "smtp1", "192.0.2.1"))


def test_known_addresses_count_per_64_and_are_forgotten_after_a_while() -> None:
    clock = Clock()
    throttle = UserLoginThrottle(max_failures=1, window=3600, known_address_age=100, clock=clock)
    throttle.succeeded(_ticket(throttle, "smtp1", "2001:db8:1:2::1"))
    assert _guess(throttle, "smtp1", "198.51.100.1")
    assert throttle.admit("smtp1", "198.51.100.2") is None
    assert isinstance(throttle.admit("smtp1", "2001:db8:1:2::beef"), LoginTicket)  # the same /64
    clock.now += 101
    assert throttle.admit("smtp1", "2001:db8:1:2::1") is None


def test_concurrent_attempts_cannot_share_one_token() -> None:
    """The token is reserved when the attempt is admitted, before the password is looked up: a
    thousand guesses sent at once while one failure is left get one verdict, not a thousand."""
    clock = Clock()
    throttle = _user_throttle(clock)
    for n in range(2):
        assert _guess(throttle, "smtp1", f"192.0.2.{n}")
    first = _ticket(throttle, "smtp1", "198.51.100.1")
    assert {throttle.admit("smtp1", f"198.51.100.{n % 250}") for n in range(1000)} == {BUSY}
    throttle.failed(first)  # the one check in flight was wrong: its token is spent
    assert {throttle.admit("smtp1", f"198.51.100.{n % 250}") for n in range(1000)} == {None}


def test_many_sessions_logging_in_at_once_wait_rather_than_being_refused() -> None:
    """Reserved is not spent: the rightful user's sessions, starting together from new addresses,
    wait for the checks in flight (BUSY) and get in as each right password gives its token back."""
    clock = Clock()
    throttle = _user_throttle(clock)
    in_flight = [_ticket(throttle, "smtp1", f"192.0.2.{n}") for n in range(3)]
    assert throttle.admit("smtp1", "192.0.2.9") is BUSY
    throttle.succeeded(in_flight.pop())
    throttle.succeeded(_ticket(throttle, "smtp1", "192.0.2.9"))
    for ticket in in_flight:
        throttle.succeeded(ticket)
    assert [_guess(throttle, "smtp1", f"198.51.100.{n}") for n in range(4)] == [True] * 3 + [False]


def test_a_ticket_ends_once() -> None:
    clock = Clock()
    throttle = _user_throttle(clock)
    ticket = _ticket(throttle, "smtp1", "192.0.2.1")
    throttle.failed(ticket)
    throttle.unanswered(ticket)  # after the verdict: changes nothing (the handler's cancel path)
    assert [_guess(throttle, "smtp1", "192.0.2.1") for _ in range(3)] == [True, True, False]


def test_an_attempt_without_a_verdict_costs_nothing() -> None:
    clock = Clock()
    throttle = _user_throttle(clock)
    for _ in range(10):  # the store was down (454 4.7.0), or the client left: nothing learnt
        throttle.unanswered(_ticket(throttle, "smtp1", "192.0.2.1"))
    assert [_guess(throttle, "smtp1", "192.0.2.1") for _ in range(4)] == [True] * 3 + [False]


def test_a_name_that_does_not_exist_runs_out_like_one_that_does() -> None:
    """No oracle: the throttle never asks whether a name exists, so its answers cannot differ."""
    clock = Clock()
    throttle = _user_throttle(clock)
    existing = [_guess(throttle, "smtp1", f"192.0.2.{n}") for n in range(6)]
    missing = [_guess(throttle, "smtp-nobody", f"198.51.100.{n}") for n in range(6)]
    assert existing == missing == [True] * 3 + [False] * 3


def test_memory_stays_bounded_whatever_names_are_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle_module, "MAX_TRACKED_NAMES", 100)
    clock = Clock()
    throttle = _user_throttle(clock)
    for n in range(1000):
        _guess(throttle, f"name{n}", "192.0.2.1")
    assert len(throttle._buckets) <= 100
    for _ in range(3):  # names longer than any SMTP user's share a bucket past 64 characters
        _guess(throttle, "y" * 64 + "a", "192.0.2.1")
    assert not _guess(throttle, "y" * 64 + "b", "192.0.2.1")
