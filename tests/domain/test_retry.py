"""The retry schedule of SPEC §5: 1, 5, 15, 30 and 60 minutes, then hourly, until the maximum age."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from poweremail.config import Settings
from poweremail.domain.retry import RetryPolicy

ACCEPTED = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
# The defaults as configured (not the environment's: POWEREMAIL_* may be set where the tests run).
DEFAULT_DELAYS: tuple[float, ...] = Settings.model_fields["retry_delays"].default
DEFAULT_MAX_AGE: float = Settings.model_fields["max_message_age"].default


def _default_policy() -> RetryPolicy:
    return RetryPolicy(delays=DEFAULT_DELAYS, max_age=DEFAULT_MAX_AGE)


def test_the_default_schedule_is_the_specified_one() -> None:
    assert tuple(DEFAULT_DELAYS) == (60, 300, 900, 1800, 3600)
    assert DEFAULT_MAX_AGE == 2 * 24 * 3600


def test_the_default_schedule_from_first_failure_to_the_deadline() -> None:
    """Each retry happens when the previous one said; the gaps are the schedule, then hourly, and the
    last one is moved up to the deadline; at the deadline there is no further attempt."""
    policy = _default_policy()
    attempts_at = [ACCEPTED]
    while (
        after := policy.next_attempt_at(attempts=len(attempts_at), accepted_at=ACCEPTED, now=attempts_at[-1])
    ) is not None:
        attempts_at.append(after)
        assert len(attempts_at) < 100, "the schedule never reaches its deadline"
    gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(attempts_at)]
    # 1 + 5 + 15 + 30 = 51 minutes, then 47 hours (to 47 h 51 min), then the 9 minutes left of 48 h.
    assert gaps == [60, 300, 900, 1800, *[3600] * 47, 540]
    assert attempts_at[-1] == ACCEPTED + timedelta(days=2)


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(1, 60), (2, 300), (3, 900), (4, 1800), (5, 3600), (6, 3600), (7, 3600), (40, 3600)],
)
def test_each_attempt_gets_its_delay_and_the_last_repeats(attempts: int, delay: float) -> None:
    now = ACCEPTED + timedelta(hours=3)
    assert _default_policy().next_attempt_at(
        attempts=attempts, accepted_at=ACCEPTED, now=now
    ) == now + timedelta(seconds=delay)


def test_a_custom_schedule_repeats_its_last_delay() -> None:
    policy = RetryPolicy(delays=(10, 25), max_age=10_000)
    now = ACCEPTED + timedelta(seconds=100)
    delays = [
        (policy.next_attempt_at(attempts=n, accepted_at=ACCEPTED, now=now) or now) - now for n in range(1, 6)
    ]
    assert delays == [timedelta(seconds=s) for s in (10, 25, 25, 25, 25)]
    single = RetryPolicy(delays=(30,), max_age=10_000)
    assert single.next_attempt_at(attempts=9, accepted_at=ACCEPTED, now=now) == now + timedelta(seconds=30)


@pytest.mark.parametrize("attempts", [0, -3])
def test_no_attempt_yet_counts_as_the_first(attempts: int) -> None:
    now = ACCEPTED + timedelta(seconds=5)
    policy = _default_policy()
    assert policy.next_attempt_at(attempts=attempts, accepted_at=ACCEPTED, now=now) == now + timedelta(
        seconds=60
    )


def test_the_final_attempt_is_moved_up_to_the_deadline() -> None:
    policy = _default_policy()
    deadline = ACCEPTED + timedelta(days=2)
    for before in (timedelta(minutes=59), timedelta(seconds=1), timedelta(microseconds=1)):
        assert policy.next_attempt_at(attempts=30, accepted_at=ACCEPTED, now=deadline - before) == deadline
    # Not moved when the regular delay still fits.
    assert (
        policy.next_attempt_at(attempts=30, accepted_at=ACCEPTED, now=deadline - timedelta(hours=1))
        == deadline
    )
    assert policy.next_attempt_at(
        attempts=30, accepted_at=ACCEPTED, now=deadline - timedelta(hours=2)
    ) == deadline - timedelta(hours=1)
    # An early failure near the deadline is not given its short delay past it either.
    assert policy.next_attempt_at(attempts=1, accepted_at=ACCEPTED, now=deadline - timedelta(seconds=20)) == (
        deadline
    )


@pytest.mark.parametrize("after", [timedelta(0), timedelta(microseconds=1), timedelta(days=5)])
def test_none_at_or_after_the_deadline(after: timedelta) -> None:
    deadline = ACCEPTED + timedelta(days=2)
    for attempts in (0, 1, 5, 60):
        assert (
            _default_policy().next_attempt_at(attempts=attempts, accepted_at=ACCEPTED, now=deadline + after)
            is None
        )


def test_the_maximum_age_is_the_policys_own() -> None:
    policy = RetryPolicy(delays=(60,), max_age=600)
    assert policy.next_attempt_at(
        attempts=1, accepted_at=ACCEPTED, now=ACCEPTED + timedelta(seconds=570)
    ) == (ACCEPTED + timedelta(seconds=600))
    assert (
        policy.next_attempt_at(attempts=1, accepted_at=ACCEPTED, now=ACCEPTED + timedelta(seconds=600))
        is None
    )
