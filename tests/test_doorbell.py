"""The doorbell between a node's SMTP workers and its delivery workers (poweremail.doorbell), on a
real pipe: rings reach the listener, a full pipe never blocks the ringer, and the listener drains
what piled up, so one answer covers every ring before it."""

from __future__ import annotations

import asyncio

from poweremail.doorbell import Doorbell


def test_a_ring_sets_the_listeners_event_and_rings_after_an_answer_set_it_again() -> None:
    async def scenario() -> None:
        bell = Doorbell()
        heard = asyncio.Event()
        stop_listening = bell.listen(heard)
        try:
            for _ in range(3):
                heard.clear()
                bell.ring()
                await asyncio.wait_for(heard.wait(), 5)
            heard.clear()
            await asyncio.sleep(0.05)
            assert not heard.is_set()  # answered rings do not wake it again
        finally:
            stop_listening()
            bell.close()

    asyncio.run(scenario())


def test_ringing_a_full_pipe_neither_blocks_nor_raises_and_one_answer_drains_it() -> None:
    async def scenario() -> None:
        bell = Doorbell()
        for _ in range(200_000):  # far more than a pipe holds (64 KiB on Linux)
            bell.ring()
        heard = asyncio.Event()
        stop_listening = bell.listen(heard)
        try:
            await asyncio.wait_for(heard.wait(), 5)
            heard.clear()
            await asyncio.sleep(0.05)
            assert not heard.is_set()  # drained whole by the first answer
        finally:
            stop_listening()
            bell.close()

    asyncio.run(scenario())


def test_forward_rings_once_for_many_events_set_in_one_turn() -> None:
    async def scenario() -> None:
        bell = Doorbell()
        queued, heard = asyncio.Event(), asyncio.Event()
        forwarding = asyncio.create_task(bell.forward(queued))
        stop_listening = bell.listen(heard)
        try:
            for _ in range(10):
                queued.set()
            await asyncio.wait_for(heard.wait(), 5)
            assert not queued.is_set()  # forward took it
        finally:
            forwarding.cancel()
            stop_listening()
            bell.close()

    asyncio.run(scenario())
