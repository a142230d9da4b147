"""The failed-login throttle: per address (IPv6 per /64), slowed, then blocked for a while."""

from __future__ import annotations

from poweremail.domain.throttle import FailedLoginThrottle, address_key


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
