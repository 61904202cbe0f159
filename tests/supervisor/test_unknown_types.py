"""Job types no live worker runs: workers claim only the types they registered
(``qdworker_workers``), and the supervisor's maintenance fails a due job of an unknown type
once, with ``UnknownJobType``, after ``QDWORKER_UNKNOWN_TYPE_TIMEOUT`` (1 s here: maintenance
then runs every 0.25 s), never while no worker is alive, and never retries it. A job that keeps
failing retries no faster than the floor of ``qdworker/_schedule/backoff.py``.

Real supervisor processes on a real Postgres."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from procs import running, start_supervisor, stop, wait_for
from psycopg.rows import dict_row

from qdworker.testing import worker_pids

#: Maintenance fails unknown types after 1 s and so runs every 0.25 s.
SETTINGS = {"QDWORKER_UNKNOWN_TYPE_TIMEOUT": "1", "QDWORKER_POLL_INTERVAL": "30"}
UNKNOWN = "nobodyRunsThis"
LIVE_WORKERS = "SELECT * FROM qdworker_workers WHERE stopped_at IS NULL ORDER BY id"


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def insert(url: str, sql: str) -> int:
    [row] = query(url, f"{sql} RETURNING id")
    return int(row["id"])


@pytest.fixture
def runs_db(db_url: str) -> str:
    """The test database plus the table the ``sleep`` and ``record`` job types write to."""
    query(
        db_url,
        "CREATE TABLE test_runs (job_id bigint, worker_id text, "
        "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    return db_url


def test_unknown_type_with_instant_retries_fails_once_and_is_not_retried(
    db_url: str, tmp_path: Path
) -> None:
    # The retry storm of the issue: a worker that claimed every type failed this job at once,
    # and its retry (delay 0) at once again, thousands of rows a minute.
    log = tmp_path / "supervisor.log"
    with running(start_supervisor(db_url, log=log, WORKER_COUNT="1", **SETTINGS)) as supervisor:
        wait_for(db_url, LIVE_WORKERS, lambda rows: len(rows) == 1)
        job_id = insert(
            db_url,
            "INSERT INTO worker_jobs (type, auto_reschedule_on_failure,"
            f" auto_reschedule_on_failure_delay) VALUES ('{UNKNOWN}', true, 0)",
        )
        [row] = wait_for(
            db_url,
            "SELECT * FROM worker_jobs WHERE id = %s AND finished IS NOT NULL",
            lambda rows: len(rows) == 1,
            params=(job_id,),
        )
        # Afterwards, two seconds of maintenance rounds and worker claims go by: a job due 2 s
        # after the failure runs (a bounded wait on an outcome).
        later = insert(
            db_url,
            "INSERT INTO worker_jobs (type, due) VALUES ('noop', now() + interval '2 seconds')",
        )
        wait_for(
            db_url,
            "SELECT 1 FROM worker_jobs WHERE id = %s AND success",
            lambda rows: len(rows) == 1,
            params=(later,),
        )
        assert stop(supervisor) == 0
    assert row["success"] is False and row["started"] is None  # no worker ever claimed it
    assert row["result"]["error_type"] == "UnknownJobType"
    assert row["dead_at"] == row["finished"]  # never retried: dead
    assert f"no live worker runs job type {UNKNOWN}" in row["result"]["error"]
    assert row["finished"] - row["due"] >= timedelta(seconds=1)  # it waited the limit
    # Exactly one row: no retry, although the job asks for instant ones.
    [only] = query(db_url, "SELECT id FROM worker_jobs WHERE type = %s", (UNKNOWN,))
    assert only["id"] == job_id
    failed = [line for line in log.read_text().splitlines() if "no live worker runs" in line]
    assert len(failed) == 1 and f"failed 1 job(s) of type '{UNKNOWN}'" in failed[0], failed


def test_failing_job_with_instant_retries_is_held_to_the_retry_floor(db_url: str) -> None:
    with running(start_supervisor(db_url, WORKER_COUNT="1", **SETTINGS)) as supervisor:
        insert(
            db_url,
            "INSERT INTO worker_jobs (type, auto_reschedule_on_failure,"
            " auto_reschedule_on_failure_delay) VALUES ('boom', true, 0)",
        )
        # Wait until the chain has gone on for more than 6 s: a row created 6 s or more after
        # the first (with the floor, the fifth, about 7 s in; in a storm, at once).
        rows = wait_for(
            db_url,
            "SELECT created_at - min(created_at) OVER () AS age FROM worker_jobs"
            " WHERE type = 'boom' ORDER BY id",
            lambda rows: rows[-1]["age"] >= timedelta(seconds=6),
        )
        assert stop(supervisor) == 0
    # Retries wait at least 1 s, 2 s, 4 s ... whatever the job's delay: rows at about 0 s
    # (the first and its retry), 1 s and 3 s in the first 6 s.
    in_six_seconds = [row for row in rows if row["age"] < timedelta(seconds=6)]
    assert len(in_six_seconds) <= 4, rows


def test_unknown_type_is_not_failed_while_no_worker_is_alive(db_url: str) -> None:
    # A stopped fleet: the last worker exited cleanly just now. Its types do not count.
    query(
        db_url,
        "INSERT INTO qdworker_workers (id, host, pid, types, concurrency, lease_seconds,"
        " stopped_at) VALUES ('gone:1:w0.1', 'gone', 1, '{noop}', 10, 30, now())",
    )
    job_id = insert(
        db_url,
        f"INSERT INTO worker_jobs (type, due) VALUES ('{UNKNOWN}', now() - interval '1 hour')",
    )
    with running(start_supervisor(db_url, WORKER_COUNT="0", **SETTINGS)) as supervisor:
        # That nothing happens can only be seen by letting maintenance run: 12 rounds (3 s at
        # one round per 0.25 s, three times the 1 s limit), each observed as an outcome, not
        # slept: every round ends by forgetting registrations older than a day, so a stale one
        # inserted before is gone once a whole round has run.
        for _ in range(12):
            query(
                db_url,
                "INSERT INTO qdworker_workers (id, host, pid, types, concurrency,"
                " lease_seconds, seen_at) VALUES"
                " ('stale:1:w0.1', 'stale', 1, '{noop}', 10, 30, now() - interval '25 hours')",
            )
            wait_for(
                db_url,
                "SELECT 1 FROM qdworker_workers WHERE id = 'stale:1:w0.1'",
                lambda rows: not rows,
            )
        [row] = query(
            db_url, "SELECT started, finished, result FROM worker_jobs WHERE id = %s", (job_id,)
        )
        assert row == {"started": None, "finished": None, "result": None}
        assert stop(supervisor) == 0


def test_known_type_waiting_for_a_busy_worker_is_not_failed(runs_db: str) -> None:
    settings = {
        **SETTINGS,
        "WORKER_COUNT": "2",
        "QDWORKER_CONCURRENCY": "1",
        "QDWORKER_LEASE_SECONDS": "5",
    }
    with running(start_supervisor(runs_db, **settings)) as supervisor:
        workers = wait_for(runs_db, LIVE_WORKERS, lambda rows: len(rows) == 2)
        # One row per live worker: its process, its supervisor and the types it runs.
        assert {w["pid"] for w in workers} == set(worker_pids(supervisor.pid))
        [supervisor_id] = {w["supervisor"] for w in workers}
        for worker in workers:
            assert worker["id"].startswith(f"{supervisor_id}:")
            assert f":{supervisor.pid}:" in worker["id"]
            assert worker["host"] == socket.gethostname()
            assert {"noop", "sleep", "boom", "raiseOnCancel", "removeOldWorkerJobs"} <= set(
                worker["types"]
            )
            assert UNKNOWN not in worker["types"]
            assert (worker["concurrency"], worker["lease_seconds"]) == (1, 5.0)
            assert worker["seen_at"] >= worker["started_at"]
        # Both workers busy for 3 s; meanwhile a job of a known type, overdue by an hour,
        # waits for a free slot much longer than the 1 s limit.
        for _ in range(2):
            insert(
                runs_db,
                """INSERT INTO worker_jobs (type, data) VALUES ('sleep', '{"seconds": 3}')""",
            )
        wait_for(runs_db, "SELECT 1 FROM test_runs", lambda rows: len(rows) == 2)
        job_id = insert(
            runs_db,
            "INSERT INTO worker_jobs (type, due) VALUES ('noop', now() - interval '1 hour')",
        )
        [row] = wait_for(
            runs_db,
            "SELECT success, result, started - created_at AS waited FROM worker_jobs"
            " WHERE id = %s AND finished IS NOT NULL",
            lambda rows: len(rows) == 1,
            params=(job_id,),
        )
        assert stop(supervisor) == 0
    assert (row["success"], row["result"]) == (True, {"ok": True})
    assert row["waited"] > timedelta(seconds=1)  # it did wait longer than the limit
    # A clean exit marks the workers stopped.
    stopped = query(runs_db, "SELECT stopped_at FROM qdworker_workers ORDER BY id")
    assert len(stopped) == 2 and all(w["stopped_at"] is not None for w in stopped)
