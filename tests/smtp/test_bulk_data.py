"""Large messages are read from one budget per node (smtp/bulk_data.py, --large-message-rate), so
that ordinary mail sent meanwhile is not held up behind them (issue 5: a 25 MiB message being
received does not stall other sessions)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from poweremail.smtp.bulk_data import BURST_SECONDS, UNMETERED_OCTETS, BulkDataBudget, metered_octets
from tests.smtp.helpers import add_smtp_user
from tests.smtp.letters import Letter, Outcome, assert_queued_as_acknowledged, queued_messages, submit
from tests.support import ServerProcess, create_owner

RATE = 1024 * 1024  # octets a second: a 3 MiB letter's last 2 MiB take the server ~2 s to read


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_lets_a_burst_through_then_paces_readers_at_its_rate() -> None:
    clock = Clock()
    budget = BulkDataBudget(rate=1000, clock=clock)
    burst = int(1000 * BURST_SECONDS)
    assert budget.wait_for(burst) == 0.0  # a full bucket
    assert budget.wait_for(500) == pytest.approx(0.5)  # overdrawn by 500 octets at 1,000 a second
    assert budget.wait_for(250) == pytest.approx(0.75)  # a second reader waits for both debts
    clock.now += 0.75
    assert budget.wait_for(0) == 0.0  # the debts are paid
    clock.now += 3600  # an idle hour saves up no more than the burst
    assert budget.wait_for(burst) == 0.0
    assert budget.wait_for(1000) == pytest.approx(1.0)


def test_only_what_is_past_a_messages_first_mib_is_metered() -> None:
    assert metered_octets(4096, 4096) == 0
    assert metered_octets(65536, UNMETERED_OCTETS) == 0
    assert metered_octets(65536, UNMETERED_OCTETS + 100) == 100  # the piece that crossed the line
    assert metered_octets(65536, UNMETERED_OCTETS + 10 * 65536) == 65536
    with pytest.raises(ValueError, match="positive"):
        BulkDataBudget(rate=0)


@pytest.fixture(scope="module")
def slow_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory: Path = tmp_path_factory.mktemp("slow-reader")
    server = ServerProcess(
        data_dir=directory / "data",
        database_url=f"sqlite:///{directory / 'db.sqlite3'}",
        log_path=directory / "serve.log",
        extra_args=("--large-message-rate", str(RATE)),
    ).start()
    yield server
    server.stop()


def test_a_large_message_is_read_at_the_rate_while_ordinary_mail_goes_through(
    slow_reader: ServerProcess,
) -> None:
    owner = create_owner(slow_reader.database_url)
    uploader, sender = add_smtp_user(slow_reader, owner), add_smtp_user(slow_reader, owner)
    large = Letter.to(1, filler=3 * 1024 * 1024 // 78)
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(submit, slow_reader.smtp_port, uploader, large)
        ordinary: list[Outcome] = []
        while not upload.done():  # one small letter after another while the large one is read
            ordinary.append(submit(slow_reader.smtp_port, sender, Letter.to(1)))
        uploaded = upload.result()
    elapsed = time.monotonic() - started

    metered = len(large.content()) - UNMETERED_OCTETS
    assert elapsed > (metered - RATE * BURST_SECONDS) / RATE * 0.9, elapsed
    # Had the wait held the event loop, these would have waited with it.
    assert len(ordinary) >= 50, (len(ordinary), elapsed)  # ~900 here; 7 when the wait blocked
    assert_queued_as_acknowledged(queued_messages(slow_reader.database_url, sender), ordinary)
    stored = queued_messages(slow_reader.database_url, uploader)
    assert_queued_as_acknowledged(stored, [uploaded])
    data = stored[uploaded.queue_id or ""].data
    assert data is not None and data.endswith(b"\r\n\r\n" + large.body())
