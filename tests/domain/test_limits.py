"""The pure rules of SPEC §3: what a send costs, which limit refuses it, when sending resumes."""

from __future__ import annotations

import pytest

from poweremail.domain.limits import Limits, OverLimit, Usage, check_limits, parse_limit


def test_within_both_limits() -> None:
    assert check_limits(limits=Limits(10, 5), usage=Usage(4, 4), recipients=1) is None


def test_the_hourly_edge_is_exact() -> None:
    limits = Limits(100, 5)
    assert check_limits(limits=limits, usage=Usage(3, 3), recipients=2) is None
    assert check_limits(limits=limits, usage=Usage(3, 3), recipients=3) == OverLimit("hourly", 5, excess=1)
    assert check_limits(limits=limits, usage=Usage(50, 5), recipients=2) == OverLimit("hourly", 5, excess=2)


def test_the_total_limit_is_checked_first_and_is_exact() -> None:
    assert check_limits(limits=Limits(5, 100), usage=Usage(4, 0), recipients=1) is None
    assert check_limits(limits=Limits(5, 100), usage=Usage(4, 0), recipients=2) == OverLimit("total", 5)
    assert check_limits(limits=Limits(5, 1), usage=Usage(5, 1), recipients=1) == OverLimit("total", 5)


def test_more_recipients_than_the_hourly_limit_can_never_go_together() -> None:
    assert check_limits(limits=Limits(100, 2), usage=Usage(0, 0), recipients=3) == OverLimit(
        "hourly", 2, excess=0
    )


def test_recipients_of_the_open_transaction_count_as_sent() -> None:
    pending = Usage(7, 1).plus(2)
    assert pending == Usage(9, 3)
    assert check_limits(limits=Limits(100, 3), usage=pending, recipients=1) == OverLimit(
        "hourly", 3, excess=1
    )


@pytest.mark.parametrize("value", [1, 2147483647, "1", "0002147483647"])
def test_good_limits(value: object) -> None:
    assert parse_limit(value) == int(str(value))


@pytest.mark.parametrize(
    "value", [0, -1, 2147483648, 1.0, True, False, None, "", " 1", "1e3", "-1", "٣", "²"]
)
def test_bad_limits(value: object) -> None:
    with pytest.raises(ValueError, match="whole number from 1 to 2147483647"):
        parse_limit(value)
