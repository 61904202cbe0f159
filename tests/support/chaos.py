"""Helpers of the fault tests (tests/faults): the supervisors' settings, bounded waits that
ride out a restarting database, and summaries of what the ``chaos`` job type did."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from waiting import wait_until

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


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """One statement on a connection of its own (faults break connections)."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=3) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def eventually(
    url: str, sql: str, ready: Callable[[list[dict[str, Any]]], bool], timeout: float = 60
) -> list[dict[str, Any]]:
    """Run ``sql`` until ``ready(rows)`` (see :func:`waiting.wait_until`), on a connection of
    its own each time: it rides out a database that is restarting."""

    def check() -> tuple[list[dict[str, Any]]] | None:  # a tuple: truthy even if rows=[]
        try:
            rows = query(url, sql)
        except psycopg.OperationalError:
            return None
        return (rows,) if ready(rows) else None

    return wait_until(check, timeout, what=repr(sql))[0]


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
