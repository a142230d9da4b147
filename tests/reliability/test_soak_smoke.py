"""reliability/soak.py still runs: 20 seconds of its mixed load on SQLite, zero errors, flat, drained.

The real soak is ten minutes (``.venv/bin/python reliability/soak.py --minutes 10``); this only keeps the
script from rotting.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import clean_env

SCRIPT = Path(__file__).resolve().parents[2] / "reliability" / "soak.py"


def test_soak_runs_for_twenty_seconds_without_errors() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--minutes", str(20 / 60), "--backend", "sqlite"],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: flat, zero errors" in result.stdout
    for row in ("| start ", "| middle ", "| end ", "| slope/min, 2nd half "):
        assert row in result.stdout, result.stdout
