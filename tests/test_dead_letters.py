"""Dead letters in SQL: the functions ``qdworker_retry_job`` / ``qdworker_retry_dead``, the
watchdog's completion, and the migration that marks the rows that died before it. Real
Postgres; dead rows are written as the completer leaves them (tests/worker/test_dead_marking.py
makes them with real workers)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from waiting import wait_until

from qdworker._db import connection, migrate, statements

DEAD_ROW = """
INSERT INTO worker_jobs (type, queue, tag, started, finished, success, result, dead_at, claims)
VALUES (%(type)s, %(queue)s, %(tag)s, now() - %(ago)s, now() - %(ago)s, false, %(result)s,
        now() - %(ago)s, 1)
RETURNING id
"""


def dead(
    sql: psycopg.Connection,
    job_type: str = "boom",
    *,
    queue: str = "default",
    error_type: str = "ValueError",
    ago: timedelta = timedelta(0),
    tag: str | None = None,
) -> int:
    """A row as the completer leaves a final failure; returns its id."""
    result = json.dumps({"error": f"it broke ({error_type})", "error_type": error_type})
    params = {"type": job_type, "queue": queue, "tag": tag, "ago": ago, "result": result}
    row = sql.execute(DEAD_ROW, params).fetchone()
    assert row is not None
    return int(row["id"])


def _redrive_in_thread(db_url: str, job_id: int, out: list[Any]) -> threading.Thread:
    def run() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            out.append(conn.execute("SELECT qdworker_retry_job(%s)", (job_id,)).fetchone())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_two_concurrent_redrives_of_one_job_make_one_attempt(
    sql: psycopg.Connection, db_url: str
) -> None:
    job_id = dead(sql)
    second: list[Any] = []
    with psycopg.connect(db_url) as first:  # a transaction, held open
        [created] = first.execute("SELECT qdworker_retry_job(%s)", (job_id,)).fetchone() or ()
        thread = _redrive_in_thread(db_url, job_id, second)
        wait_until(
            lambda: sql.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'SELECT qdworker_retry_job%'"
            ).fetchone(),
            what="the second redrive to wait for the first",
        )
        first.commit()
    thread.join(timeout=20)
    assert created is not None and second == [(None,)]
    rows = sql.execute("SELECT id FROM worker_jobs WHERE rescheduled_from_job = %s", (job_id,))
    assert [row["id"] for row in rows] == [created]


def test_bulk_redrive_skips_superseded_tags_and_wakes_workers_once(
    sql: psycopg.Connection, db_url: str
) -> None:
    first = dead(sql, tag="report:1", ago=timedelta(minutes=2))
    superseded = dead(sql, tag="report:1", ago=timedelta(minutes=1))
    plain = dead(sql)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN qdworker_jobs")
        rows = sql.execute("SELECT * FROM qdworker_retry_dead()").fetchall()
        heard = list(listener.notifies(timeout=1.0))
    pairs = {row["old_id"]: row["new_id"] for row in rows}
    assert list(pairs) == [first, superseded, plain]
    assert pairs[first] is not None and pairs[plain] is not None and pairs[superseded] is None
    assert [n.payload for n in heard] == ["insert"]
    [still] = sql.execute("SELECT id FROM worker_jobs WHERE dead_at IS NOT NULL").fetchall()
    assert still["id"] == superseded


def test_the_watchdogs_failures_are_dead(sql: psycopg.Connection) -> None:
    running = sql.execute(
        "INSERT INTO worker_jobs (type, started, claims, lease_owner) VALUES"
        " ('stuck', now(), 1, 'w'), ('fine', now(), 1, 'w') RETURNING id"
    ).fetchall()
    stuck, fine = (row["id"] for row in running)
    sql.execute(
        statements.get("complete"),
        {"ids": [stuck, fine], "claims": [1, 1], "success": [False, True],
         "results": ['{"error": "stuck", "error_type": "JobTimeout"}', "{}"]},
    )  # fmt: skip
    rows = sql.execute("SELECT id, dead_at FROM worker_jobs ORDER BY id").fetchall()
    assert [row["dead_at"] is not None for row in rows] == [True, False]


async def test_migration_marks_the_jobs_that_died_before_it(empty_db_url: str) -> None:
    conn = await connection.connect(empty_db_url)
    try:
        await migrate.apply(conn, [m for m in migrate.available() if m.version < 7])
        await conn.execute(
            """INSERT INTO worker_jobs (type, finished, success, result, cancel_requested_at)
            VALUES ('final', now(), false, '{"error_type": "ValueError"}', NULL),
                   ('retried', now(), false, '{"error_type": "ValueError"}', NULL),
                   ('cancelled', now(), false, '{"error_type": "JobCancelled"}', now()),
                   ('replaced', now(), false, '{"error": "Job cancelled due to new job"}', now()),
                   ('ok', now(), true, '{}', NULL), ('pending', NULL, NULL, NULL, NULL)"""
        )
        await conn.execute(
            "INSERT INTO worker_jobs (type, rescheduled_from_job) SELECT 'retry', id"
            " FROM worker_jobs WHERE type = 'retried'"
        )
        await migrate.apply(conn)
    finally:
        await conn.aclose()
    with psycopg.connect(empty_db_url, row_factory=dict_row) as check:
        rows = check.execute("SELECT type, dead_at = finished AS dead FROM worker_jobs").fetchall()
    assert {row["type"] for row in rows if row["dead"]} == {"final"}
