"""The pure rules of SPEC §3: what a send costs, which limit refuses it, when sending resumes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from poweremail.domain.limits import Limits, OverLimit, Usage, check_limits, parse_limit

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _usage(total: int, *hour: tuple[int, int]) -> Usage:
    """``hour``: (minutes ago, recipients) pairs, oldest first."""
    return Usage(total, tuple((NOW - timedelta(minutes=ago), count) for ago, count in hour))


def test_within_both_limits() -> None:
    assert check_limits(limits=Limits(10, 5), usage=_usage(4, (30, 4)), recipients=1) is None


def test_the_hourly_edge_is_exact() -> None:
    limits = Limits(100, 5)
    assert check_limits(limits=limits, usage=_usage(3, (10, 3)), recipients=2) is None
    refusal = check_limits(limits=limits, usage=_usage(3, (10, 3)), recipients=3)
    assert refusal == OverLimit("hourly", resume_at=NOW - timedelta(minutes=10) + timedelta(hours=1))


def test_resume_is_when_enough_of_the_window_has_expired() -> None:
    # 2 + 2 + 1 sent; limit 5; 3 more need 3 freed: the two oldest messages (4 recipients).
    usage = _usage(5, (50, 2), (40, 2), (5, 1))
    refusal = check_limits(limits=Limits(100, 5), usage=usage, recipients=3)
    assert refusal == OverLimit("hourly", resume_at=NOW + timedelta(minutes=20))


def test_the_total_limit_is_checked_first_and_is_exact() -> None:
    assert check_limits(limits=Limits(5, 100), usage=_usage(4), recipients=1) is None
    assert check_limits(limits=Limits(5, 100), usage=_usage(4), recipients=2) == OverLimit("total")
    assert check_limits(limits=Limits(5, 1), usage=_usage(5, (1, 1)), recipients=1) == OverLimit("total")


def test_more_recipients_than_the_hourly_limit_can_never_go_together() -> None:
    assert check_limits(limits=Limits(100, 2), usage=_usage(0), recipients=3) == OverLimit("hourly", None)


def test_recipients_of_the_open_transaction_count_as_sent_now() -> None:
    pending = _usage(0).plus(2, at=NOW)
    assert pending.sent_total == 2 and pending.sent_last_hour == 2
    refusal = check_limits(limits=Limits(100, 2), usage=pending, recipients=1)
    assert refusal == OverLimit("hourly", resume_at=NOW + timedelta(hours=1))


@pytest.mark.parametrize("value", [1, 2147483647, "1", "0002147483647"])
def test_good_limits(value: object) -> None:
    assert parse_limit(value) == int(str(value))


@pytest.mark.parametrize(
    "value", [0, -1, 2147483648, 1.0, True, False, None, "", " 1", "1e3", "-1", "٣", "²"]
)
def test_bad_limits(value: object) -> None:
    with pytest.raises(ValueError, match="whole number from 1 to 2147483647"):
        parse_limit(value)
