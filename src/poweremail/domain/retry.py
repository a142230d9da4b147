"""When a recipient that failed for now is tried again, and when it is given up on (SPEC §5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    """``delays[i]`` seconds after attempt ``i + 1`` failed; the last delay repeats. A recipient
    accepted ``max_age`` seconds ago or more is not tried again: it bounces."""

    delays: Sequence[float]
    max_age: float

    def next_attempt_at(self, *, attempts: int, accepted_at: datetime, now: datetime) -> datetime | None:
        """When to try again after ``attempts`` failed attempts; None once that would be past the
        maximum age. The last try is moved up to the deadline rather than skipped, so a recipient
        gets a final attempt at its maximum age (as Postfix's maximal_queue_lifetime does)."""
        deadline = accepted_at + timedelta(seconds=self.max_age)
        if now >= deadline:
            return None
        delay = self.delays[min(max(attempts, 1), len(self.delays)) - 1]
        return min(now + timedelta(seconds=delay), deadline)
