"""pytest fixtures for applications that use qdworker.

Enable them in your ``conftest.py``::

    pytest_plugins = ["qdworker.testing.pytest_plugin"]

* ``qdworker_server_url`` (session): a Postgres server for the session:
  ``QDWORKER_TEST_DATABASE_URL`` or the embedded one, started once;
* ``qdworker_databases`` (session): the migrated template and its clones
  (:class:`~qdworker.testing.TestDatabases`);
* ``qdworker_db_url`` (each test): a fresh, migrated database of its own, dropped afterwards;
* ``qdworker_inline`` (each test): an :class:`~qdworker.testing.InlineWorker` on that
  database (use it from trio tests: ``runs = await qdworker_inline.run_due()``).

Session-wide resources are sync fixtures (pytest-trio's async fixtures are per test).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from ._databases import TestDatabases, test_server
from ._inline import InlineWorker

__all__ = ["qdworker_databases", "qdworker_db_url", "qdworker_inline", "qdworker_server_url"]


@pytest.fixture(scope="session")
def qdworker_server_url() -> Iterator[str]:
    with test_server() as url:
        yield url


@pytest.fixture(scope="session")
def qdworker_databases(qdworker_server_url: str) -> Iterator[TestDatabases]:
    databases = TestDatabases(qdworker_server_url)
    databases.create_template()
    yield databases
    databases.drop_template()


@pytest.fixture
def qdworker_db_url(qdworker_databases: TestDatabases) -> Iterator[str]:
    with qdworker_databases.clone() as url:
        yield url


@pytest.fixture
async def qdworker_inline(qdworker_db_url: str) -> AsyncIterator[InlineWorker]:
    async with InlineWorker(qdworker_db_url) as worker:
        yield worker
