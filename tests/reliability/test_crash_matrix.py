"""The crash matrix in CI (issue 6, item 1): 10 SIGKILLs of a node under SMTP load and delivery, at
random moments and aimed ones (mid-DATA, after a 250, mid-delivery, at the remote 250), on SQLite and
PostgreSQL; then every 250 stored, nothing partial, all delivered, usage exact, duplicates only for
recipients in flight at a kill. The long run (200 kills and more): reliability/crash_matrix.py."""

from __future__ import annotations

import os
from pathlib import Path

from tests.reliability.crash_matrix import run_crash_matrix

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
