"""Fixtures: every store-backed test runs on real SQLite and on the real PostgreSQL.

PostgreSQL's URL comes from POWEREMAIL_TEST_DATABASE_URL (default postgres@127.0.0.1:5432/test);
each session creates its own databases there and drops them. When CI is set an unreachable
PostgreSQL fails the run; elsewhere its tests skip with one line saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Owner,
    ServerProcess,
    create_owner,
    create_postgres_database,
    drop_postgres_database,
    postgres_server_url,
    run,
)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _new_database_url(backend: str, directory: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{directory / 'poweremail.sqlite3'}"
    try:
        return run(create_postgres_database())
    except (OSError, TimeoutError) as exc:
        reason = f"PostgreSQL not reachable at {postgres_server_url()} ({exc})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it", pytrace=False)
        pytest.skip(f"{reason}; set POWEREMAIL_TEST_DATABASE_URL to run these tests")


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of the current backend, for this test alone."""
    url = _new_database_url(backend, tmp_path)
    yield url
    if backend == "postgresql":
        run(drop_postgres_database(url))


@pytest.fixture(scope="session")
def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``poweremail serve`` per backend, shared by the tests; each test makes its own owners."""
    directory = tmp_path_factory.mktemp(f"server-{backend}")
    url = _new_database_url(backend, directory)
    process = ServerProcess(
        data_dir=directory / "data",
        database_url=url,
        log_path=directory / "serve.log",
        # Many tests fail logins on purpose from 127.0.0.1; the throttle has tests of its own.
        extra_args=("--failed-logins-per-address", "100000", "--failed-login-delay", "0"),
    ).start()
    yield process
    process.stop()
    if backend == "postgresql":
        run(drop_postgres_database(url))


@pytest.fixture
def owner(server: ServerProcess) -> Owner:
    return create_owner(server.database_url)


@pytest.fixture
def other_owner(server: ServerProcess) -> Owner:
    return create_owner(server.database_url)
