"""Fault tests: a Postgres server of their own (restartable), real supervisors, faults
injected for real. Helpers shared by the fault tests live in ``tests/support/chaos.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qdworker.testing import PostgresServer, TestDatabases


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    """A Postgres server of this test's own (TCP, restartable), running."""
    with PostgresServer.create(settings={"max_connections": "200"}) as server:
        server.start()
        yield server


@pytest.fixture
def pg_db(pg: PostgresServer) -> str:
    """A migrated database on :func:`pg`."""
    return TestDatabases(pg.url()).create_template()


@pytest.fixture
def runs_file(tmp_path: Path) -> Path:
    return tmp_path / "runs.log"
