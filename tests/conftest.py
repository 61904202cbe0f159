"""Test session: qdworker's own test kit (``qdworker.testing``) gives one real Postgres, one
migrated template, and a fresh clone of it per test. The names below are the suite's
shorthands for the kit's fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from qdworker.testing import TestDatabases, with_dbname

pytest_plugins = ["qdworker.testing.pytest_plugin"]

# Test helpers (procs) and job types (qdtest_jobs) live in tests/support.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

__all__ = ["dbname_of", "with_dbname"]


@pytest.fixture(scope="session")
def pg_server_url(qdworker_server_url: str) -> str:
    """URL of the server's maintenance database (``postgres``)."""
    return qdworker_server_url


@pytest.fixture(scope="session")
def template_url(qdworker_databases: TestDatabases) -> str:
    """The migrated template database."""
    return with_dbname(qdworker_databases.server_url, qdworker_databases.template)


@pytest.fixture
def db_url(qdworker_db_url: str) -> str:
    """A fresh, migrated database for this test only."""
    return qdworker_db_url


@pytest.fixture
def empty_db_url(qdworker_databases: TestDatabases) -> Iterator[str]:
    """A fresh database with no schema at all."""
    with qdworker_databases.clone("qdworker_empty", empty=True) as url:
        yield url


@pytest.fixture
def sql(db_url: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit psycopg connection to the test database (for SQL-side checks)."""
    with psycopg.connect(db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        yield conn


def dbname_of(url: str) -> str:
    return str(conninfo_to_dict(url).get("dbname"))
