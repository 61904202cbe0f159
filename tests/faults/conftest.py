"""Fault tests: a Postgres server of their own (restartable), real supervisors, faults
injected for real. The ``chaos`` job type records every run's start and end in a file, so
overlapping runs are found without asking the database."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from qdworker.testing import PostgresServer, TestDatabases

#: Settings of the supervisors in fault tests: short leases and timeouts so faults resolve in
#: seconds, and a poll far longer than any wait, so a job found late was found by the poll.
FAULT_SETTINGS = {
    "WORKER_COUNT": "2",
    "QDWORKER_CONCURRENCY": "10",
    "QDWORKER_LEASE_SECONDS": "3",
    "QDWORKER_DB_TIMEOUT": "2",
    "QDWORKER_POLL_INTERVAL": "30",
    "QDWORKER_SHUTDOWN_TIMEOUT": "5",
    "WORKER_LOG_LEVEL": "info",
}


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


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """One statement on a connection of its own (faults break connections)."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=3) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def eventually(
    url: str, sql: str, ready: Callable[[list[dict[str, Any]]], bool], timeout: float = 60
) -> list[dict[str, Any]]:
    """Run ``sql`` until ``ready(rows)``; rides out a database that is restarting. Fails after
    ``timeout`` seconds. It waits for an outcome, bounded; it is not a sleep."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while True:
        try:
            rows = query(url, sql)
            if ready(rows):
                return rows
        except psycopg.OperationalError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting on {sql!r}: {rows!r}")
        time.sleep(0.05)


def finished(url: str, at_least: int, timeout: float = 60) -> None:
    eventually(
        url,
        "SELECT count(*) AS n FROM worker_jobs WHERE type = 'chaos' AND finished IS NOT NULL",
        lambda rows: rows[0]["n"] >= at_least,
        timeout,
    )


def insert_chaos(url: str, n: int, seconds: float) -> None:
    query(
        url,
        "INSERT INTO worker_jobs (type, data) SELECT 'chaos', jsonb_build_object('seconds', %s)"
        " FROM generate_series(1, %s)",
        (seconds, n),
    )


def outcome_summary(url: str) -> dict[str, Any]:
    [row] = query(
        url,
        """SELECT count(*) AS jobs,
                  count(*) FILTER (WHERE success) AS succeeded,
                  count(*) FILTER (WHERE finished IS NULL) AS unfinished,
                  coalesce(sum(lost_runs), 0) AS lost_runs,
                  coalesce(max(attempt), 0) AS max_attempt
             FROM worker_jobs WHERE type = 'chaos'""",
    )
    return row


def log_lines(path: Path, needle: str) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if needle in line]
