"""Test session: one real Postgres, one freshly migrated database per test.

The session starts the embedded Postgres (or uses ``QDWORKER_TEST_DATABASE_URL``), migrates a
template database once, and gives each test its own clone (``CREATE DATABASE … TEMPLATE``),
dropped afterwards. Async fixtures are function-scoped (pytest-trio).
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Test helpers (procs) and job types (qdtest_jobs) live in tests/support.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# One template per test session, so concurrent sessions on one server never clash.
TEMPLATE_DB = f"qdworker_test_template_{os.getpid()}"
DATA_DIR = Path(os.environ.get("QDWORKER_TEST_DATA_DIR", "/tmp/qdworker-test-pg"))


def _admin(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def with_dbname(url: str, dbname: str) -> str:
    return make_conninfo(url, dbname=dbname)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of the server's maintenance database (``postgres``)."""
    url = os.environ.get("QDWORKER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from qdworker.db import embedded
    from qdworker.errors import EmbeddedDatabaseError

    try:
        server = embedded.start(DATA_DIR)
    except EmbeddedDatabaseError:
        # A data dir left broken by an earlier run must not fail the suite: start afresh.
        server = embedded.start(Path(tempfile.mkdtemp(prefix="qdworker-test-pg-")))
    try:
        yield server.url
    finally:
        embedded.stop(server)


@pytest.fixture(scope="session")
def template_url(pg_server_url: str) -> Iterator[str]:
    """A database with the schema applied (migrated once per session, dropped at its end)."""
    import trio

    from qdworker.db import connection, migrate

    with _admin(pg_server_url) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    url = with_dbname(pg_server_url, TEMPLATE_DB)

    async def setup() -> None:
        conn = await connection.connect(url, "test", statement_timeout=False)
        try:
            await migrate.apply(conn)
        finally:
            await conn.aclose()

    trio.run(setup)
    yield url
    with _admin(pg_server_url) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")


@contextmanager
def _scratch_database(server_url: str, prefix: str, template: str | None) -> Iterator[str]:
    """A new database (a copy of ``template``, if given), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    create = f"CREATE DATABASE {name}"
    if template is not None:
        create += f" TEMPLATE {template} STRATEGY FILE_COPY"
    with _admin(server_url) as admin:
        admin.execute(create)
    try:
        yield with_dbname(server_url, name)
    finally:
        with _admin(server_url) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(pg_server_url: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    with _scratch_database(pg_server_url, "qdworker_test", TEMPLATE_DB) as url:
        yield url


@pytest.fixture
def empty_db_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    with _scratch_database(pg_server_url, "qdworker_empty", None) as url:
        yield url


@pytest.fixture
def sql(db_url: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit psycopg connection to the test database (for SQL-side checks)."""
    with psycopg.connect(db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        yield conn


def dbname_of(url: str) -> str:
    return str(conninfo_to_dict(url).get("dbname"))
