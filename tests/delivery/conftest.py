"""Fixtures for the delivery tests: nodes that deliver, each on a fresh database of the backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poweremail.store.database import Database
from tests.delivery.helpers import FAST_DELIVERY
from tests.support import Owner, ServerProcess, create_owner, run

StartNode = Callable[..., ServerProcess]


@pytest.fixture
def start_node(database_url: str, tmp_path: Path) -> Iterator[StartNode]:
    """``start_node("--relay", receiver.address, ...)``: ``poweremail serve`` with every role on this
    test's database, retrying fast; stopped when the test ends."""
    started: list[ServerProcess] = []

    def start(*args: str, roles: str = "api,smtp,delivery", name: str | None = None) -> ServerProcess:
        index = len(started)
        node = ServerProcess(
            data_dir=tmp_path / "data",
            database_url=database_url,
            log_path=tmp_path / f"serve-{index}.log",
            roles=roles,
            extra_args=("--node-name", name or f"node-{index}", *FAST_DELIVERY, *args),
        ).start()
        started.append(node)
        return node

    yield start
    for node in started:
        if node.process is not None and node.process.poll() is None:
            node.stop()


@pytest.fixture
def sender(database_url: str) -> Owner:
    """An owner in this test's database (migrated first: the node may not have started yet)."""
    run(_migrate(database_url))
    return create_owner(database_url)


async def _migrate(database_url: str) -> None:
    database = Database(database_url)
    try:
        await database.migrate()
    finally:
        await database.close()
