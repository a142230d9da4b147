"""poweremail.batches: what callers submit while a batch is handled becomes the next batch; with
``gather``, the first caller of a quiet moment waits that long for others to join it."""

from __future__ import annotations

import asyncio

from poweremail.batches import Batch, Batches


def _record_batches(gather: float) -> list[list[int]]:
    seen: list[list[int]] = []

    async def handle(batch: Batch[int, int]) -> None:
        seen.append([item for item, _ in batch])
        for item, future in batch:
            future.set_result(item * 10)

    async def scenario() -> list[int]:
        batches: Batches[int, int] = Batches(handle, max_batch=10, name="test", gather=gather)

        async def later(item: int, delay: float) -> int:
            await asyncio.sleep(delay)
            return await batches.submit(item)

        # Three callers 20 ms apart, in a quiet moment.
        return await asyncio.gather(*(later(item, item * 0.02) for item in range(3)))

    assert asyncio.run(scenario()) == [0, 10, 20]  # every caller gets its own result
    return seen


def test_without_gather_the_first_caller_of_a_quiet_moment_goes_alone() -> None:
    assert _record_batches(0.0) == [[0], [1], [2]]


def test_with_gather_callers_arriving_meanwhile_share_its_batch() -> None:
    assert _record_batches(0.2) == [[0, 1, 2]]
