"""The crash matrix in CI (issue 6, item 1): 10 SIGKILLs of a node under SMTP load and delivery, at
random moments and aimed ones (mid-DATA, after a 250, mid-delivery, at the remote 250), on SQLite and
PostgreSQL; then every 250 stored, nothing partial, all delivered, usage exact, duplicates only for
recipients in flight at a kill. The long run (200 kills and more): reliability/crash_matrix.py."""

from __future__ import annotations

import os
from pathlib import Path

from tests.delivery.receiver import ReceivedMessage
from tests.delivery.test_crash_and_scale import SENDER
from tests.reliability.crash_matrix import Attempt, Figures, _judge, _Stored, run_crash_matrix

KILLS = 10


def test_sigkill_at_random_moments_loses_nothing_alters_nothing_and_counts_exactly(
    database_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("POWEREMAIL_CRASH_MATRIX_SEED", "0")) or int.from_bytes(os.urandom(4), "big")
    figures = run_crash_matrix(database_url, tmp_path, kills=KILLS, seed=seed)
    print("\n" + figures.summary())
    assert figures.kills == KILLS
    assert not figures.problems(), f"seed {seed}: " + "; ".join(figures.problems()) + "\n" + figures.summary()
    assert figures.answered_250 > 0 and figures.states["delivered"] > 0, figures.summary()
    assert figures.usage_mismatch == 0 and not figures.lost and not figures.partial


def test_the_matrix_judge_sees_each_violation() -> None:
    """The checks themselves, on made-up outcomes: a 250 not stored, a stored message cut short, an
    arrival that is not a whole stored message, a recipient left queued, one sent twice outside any
    kill's in-flight set, and usage off by one are each reported; a clean outcome reports nothing."""
    received = b"Received: from client by node\r\n\tfor <x>; now\r\n"

    def attempt(n: int, queue_id: str | None, data: bytes = b"Subject: m\r\n\r\nbody\r\n") -> Attempt:
        return Attempt(n, [f"m{n}@dest.test"], data, "answered", 250 if queue_id else None, queue_id)

    def arrival(address: str, data: bytes) -> ReceivedMessage:
        return ReceivedMessage(SENDER, [address], data, "127.0.0.1", False, None, 1)

    ok, lost, cut, queued, twice = (
        attempt(1, "Q1"),
        attempt(2, "Q2"),
        attempt(3, "Q3"),
        attempt(4, "Q4"),
        attempt(5, "Q5"),
    )
    stored = [
        _Stored("Q1", received + ok.data, {"m1@dest.test": "delivered"}),
        _Stored("Q3", received + cut.data[:-3], {"m3@dest.test": "delivered"}),
        _Stored("Q4", received + queued.data, {"m4@dest.test": "queued"}),
        _Stored("Q5", received + twice.data, {"m5@dest.test": "delivered"}),
    ]
    arrived = [
        arrival("m1@dest.test", received + ok.data),
        arrival("m3@dest.test", received + cut.data[:-3]),
        arrival("m5@dest.test", received + twice.data),
        arrival("m5@dest.test", received + twice.data),
        arrival("m1@dest.test", (received + ok.data)[:-5]),
    ]
    figures = Figures("test", 0, kills=1, usage_total=3)
    _judge(figures, [ok, lost, cut, queued, twice], stored, arrived, in_flight={"m1@dest.test"})
    problems = "\n".join(figures.problems())
    assert figures.lost == ["Q2"], problems
    assert len(figures.partial) == 2 and "Q3" in figures.partial[0], figures.partial
    assert figures.not_done == ["m4@dest.test queued"], problems
    assert "1 sent twice though not in flight" in problems and "m5@dest.test" in problems, problems
    assert figures.usage_mismatch == -1 and "usage 3 != 4" in problems, problems

    clean = Figures("test", 0, kills=1, usage_total=1)
    _judge(clean, [ok], stored[:1], arrived[:1] * 2, in_flight={"m1@dest.test"})
    assert not clean.problems() and clean.duplicates == {"m1@dest.test": (2, True)}
