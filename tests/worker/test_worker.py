"""A worker process against real Postgres: results, failures, leases, shutdown, wake-ups."""

from __future__ import annotations

import signal
from datetime import timedelta

import psycopg
from procs import all_finished, running, start_worker, stop, wait_for
from psycopg.rows import dict_row

from qdworker.testing import drop_notifications

JOBS = "SELECT * FROM worker_jobs ORDER BY id"


def sql(db_url: str, query: str, params: object = None) -> list[dict[str, object]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def test_jobs_inserted_by_sql_finish_with_their_results(jobs_db: str) -> None:
    sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, data) VALUES
        ('noop', '{}'), ('echo', '{"a": 1}'), ('boom', '{"message": "bad thing"}'),
        ('badResult', '{}'), ('hugeResult', '{}'), ('nope', '{}'), ('threaded', '{}'),
        ('aio', '{}'), ('record', '{}')""",
    )
    with running(start_worker(jobs_db)) as worker:
        rows = wait_for(
            jobs_db, JOBS, lambda rows: all_finished([r for r in rows if r["type"] != "nope"])
        )
        results = {r["type"]: (r["success"], r["result"]) for r in rows}
        assert results["noop"] == (True, {"ok": True})
        assert results["echo"] == (True, {"a": 1})
        assert results["boom"] == (False, {"error": "bad thing", "error_type": "ValueError"})
        assert results["badResult"][0] is False
        assert results["badResult"][1]["error"].startswith("result is not JSON-serialisable")
        assert results["hugeResult"][0] is False and "limit" in results["hugeResult"][1]["error"]
        # A type this worker does not run is not claimed: it waits for a worker that does
        # (the supervisor fails it after QDWORKER_UNKNOWN_TYPE_TIMEOUT, tested elsewhere).
        [nope] = [r for r in rows if r["type"] == "nope"]
        assert (nope["started"], nope["claims"], nope["finished"]) == (None, 0, None)
        assert results["threaded"] == (True, {"thread": True})
        assert results["aio"] == (True, {"asyncio": True, "answer": 42})
        # the worker keeps going after all that
        sql(jobs_db, "INSERT INTO worker_jobs (type) VALUES ('record')")
        wait_for(jobs_db, "SELECT * FROM test_runs", lambda rows: len(rows) == 2)
        assert stop(worker) == 0


def test_sigkilled_worker_job_runs_again_and_stale_completion_is_rejected(jobs_db: str) -> None:
    settings = {"QDWORKER_LEASE_SECONDS": "1", "QDWORKER_POLL_INTERVAL": "0.5"}
    with running(start_worker(jobs_db, **settings)) as first:
        [job] = sql(
            jobs_db,
            "INSERT INTO worker_jobs (type, data) VALUES ('sleep', '{\"seconds\": 60}') RETURNING id, claims",
        )
        wait_for(jobs_db, "SELECT * FROM test_runs", lambda rows: len(rows) == 1)
        first.send_signal(signal.SIGKILL)
        first.wait()
    [stale] = sql(jobs_db, "SELECT claims FROM worker_jobs WHERE id = %s", (job["id"],))
    sql(jobs_db, "UPDATE worker_jobs SET data = '{\"seconds\": 0.1}' WHERE id = %s", (job["id"],))
    with running(start_worker(jobs_db, **settings)) as second:
        rows = wait_for(jobs_db, JOBS, all_finished)
        assert stop(second) == 0
    assert rows[0]["success"] is True
    assert rows[0]["attempt"] == 2 and rows[0]["lost_runs"] == 1 and rows[0]["claims"] == 2
    assert len(sql(jobs_db, "SELECT * FROM test_runs")) == 2
    # the first run's completion, fenced by its claim count, is refused
    from qdworker._db import statements

    refused = sql(
        jobs_db,
        statements.get("complete"),
        {
            "ids": [job["id"]],
            "claims": [stale["claims"]],
            "success": [False],
            "results": ['{"late": true}'],
        },
    )
    assert refused == []
    assert sql(jobs_db, "SELECT result FROM worker_jobs")[0]["result"] == {"slept": 0.1}


def test_long_job_is_not_rerun_while_its_worker_lives(jobs_db: str) -> None:
    settings = {"QDWORKER_LEASE_SECONDS": "1", "QDWORKER_POLL_INTERVAL": "0.2"}
    with (
        running(start_worker(jobs_db, **settings)) as a,
        running(start_worker(jobs_db, **settings)) as b,
    ):
        sql(jobs_db, "INSERT INTO worker_jobs (type, data) VALUES ('sleep', '{\"seconds\": 3.5}')")
        rows = wait_for(jobs_db, JOBS, all_finished, timeout=30)
        assert stop(a) == 0 and stop(b) == 0
    assert rows[0]["success"] is True and rows[0]["claims"] == 1
    assert len(sql(jobs_db, "SELECT * FROM test_runs")) == 1


def test_sigterm_finishes_short_jobs_and_releases_long_ones(jobs_db: str) -> None:
    with running(start_worker(jobs_db, QDWORKER_SHUTDOWN_TIMEOUT="1.5")) as worker:
        sql(
            jobs_db,
            """INSERT INTO worker_jobs (type, data) VALUES
            ('sleep', '{"seconds": 0.3}'), ('sleep', '{"seconds": 0.3}'),
            ('sleep', '{"seconds": 60}'), ('sleep', '{"seconds": 60}')""",
        )
        wait_for(jobs_db, "SELECT * FROM test_runs", lambda rows: len(rows) == 4)
        assert stop(worker) == 0
    rows = sql(jobs_db, JOBS)
    assert [r["success"] for r in rows[:2]] == [True, True]
    for row in rows[2:]:
        assert row["started"] is None and row["finished"] is None and row["lease_owner"] is None
    assert (
        sql(jobs_db, "SELECT * FROM worker_jobs WHERE started IS NOT NULL AND finished IS NULL")
        == []
    )


def test_hurry_signal_after_sigterm_cancels_at_once(jobs_db: str) -> None:
    """SIGUSR1 is what the supervisor sends on a second signal (a repeated SIGTERM could be
    coalesced by trio before the worker reads it; tests/test_cli.py covers the double SIGTERM)."""
    with running(start_worker(jobs_db, QDWORKER_SHUTDOWN_TIMEOUT="60")) as worker:
        sql(jobs_db, "INSERT INTO worker_jobs (type, data) VALUES ('sleep', '{\"seconds\": 60}')")
        wait_for(jobs_db, "SELECT * FROM test_runs", lambda rows: len(rows) == 1)
        worker.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGUSR1)
        assert worker.wait(timeout=10) == 0
    [row] = sql(jobs_db, JOBS)
    assert row["started"] is None and row["finished"] is None


def test_poll_finds_jobs_when_notify_is_lost(jobs_db: str) -> None:
    with (
        drop_notifications(jobs_db),
        running(start_worker(jobs_db, QDWORKER_POLL_INTERVAL="1")) as worker,
    ):
        # A first job proves the worker is in its loop, so the second cannot be found by the
        # start-up claim: only the poll can find it.
        sql(jobs_db, "INSERT INTO worker_jobs (type) VALUES ('noop')")
        wait_for(jobs_db, JOBS, all_finished, timeout=10)
        [job] = sql(
            jobs_db, "INSERT INTO worker_jobs (type) VALUES ('noop') RETURNING id, created_at"
        )
        [row] = wait_for(jobs_db, "SELECT * FROM worker_jobs WHERE id = %s", all_finished,
                         timeout=10, params=(job["id"],))  # fmt: skip
        assert stop(worker) == 0
    # Found by the 1 s poll; a worker ignoring the setting would wait for the 5 s default poll
    # or longer. The margin is for a busy machine.
    assert row["started"] - job["created_at"] < timedelta(seconds=4)


def test_job_due_later_starts_on_time(jobs_db: str) -> None:
    with running(start_worker(jobs_db, QDWORKER_POLL_INTERVAL="30")) as worker:
        sql(jobs_db, "INSERT INTO worker_jobs (type) VALUES ('noop')")
        wait_for(jobs_db, JOBS, all_finished)
        [job] = sql(
            jobs_db,
            "INSERT INTO worker_jobs (type, due) VALUES ('noop', now() + interval '2 seconds') RETURNING id, due",
        )
        rows = wait_for(
            jobs_db, "SELECT * FROM worker_jobs WHERE id = %s", all_finished, params=(job["id"],)
        )
        assert stop(worker) == 0
    late = rows[0]["started"] - job["due"]
    # Woken at ``due``: without that wake-up it would start at the 30 s poll, ~28 s late.
    assert timedelta(0) <= late < timedelta(seconds=10)


def test_values_postgres_refuses_fail_their_job_and_block_nothing(jobs_db: str) -> None:
    sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay) VALUES ('boom', true, 9000000000000000000)""",
    )
    sql(jobs_db, "INSERT INTO worker_jobs (type) VALUES ('nulResult'), ('nulError'), ('noop')")
    with running(start_worker(jobs_db)) as worker:
        rows = wait_for(jobs_db, JOBS, all_finished)
        sql(jobs_db, "INSERT INTO worker_jobs (type) VALUES ('record')")  # still working
        wait_for(jobs_db, "SELECT * FROM test_runs", lambda r: len(r) == 1)
        assert stop(worker) == 0
    results = {r["type"]: (r["success"], r["result"]) for r in rows}
    assert results["boom"][1]["error_type"] == "UnstorableOutcome"  # its retry delay overflowed
    assert results["nulResult"][1]["error"].startswith("result contains a NUL character")
    assert results["nulError"] == (
        False, {"error": "bad \\x00 byte and a lone \\ud800 surrogate", "error_type": "ValueError"})  # fmt: skip
    assert results["noop"] == (True, {"ok": True})
