"""ctx.progress on real worker processes and real Postgres (migration 0012): rate-limited
writes of the latest value, plain-def handlers, invalid reports, the claim fence."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from procs import all_finished, running, start_worker, stop, wait_for
from psycopg.rows import dict_row
from qdprogress_jobs import REPORTS

from qdworker._db.progress import write_progress
from qdworker._worker.progress import progress_value

JOBS = {"QDWORKER_JOBS": "qdprogress_jobs", "QDWORKER_POLL_INTERVAL": "0.5"}
#: Samples of the row per second while a tight loop reports (far above the write rate).
SAMPLE_HZ = 200
#: The promise: at most this many writes of one run's progress a second (plus the last one).
MOST_WRITES_PER_SECOND = 4


def sql(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def insert(db_url: str, job_type: str, data: str = "{}") -> int:
    [row] = sql(db_url, "INSERT INTO worker_jobs (type, data) VALUES (%s, %s) RETURNING id",
                (job_type, data))  # fmt: skip
    return int(row["id"])


def sample_progress(db_url: str, job_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every distinct progress value the row showed while it ran (sampled at SAMPLE_HZ), and
    the finished row."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT progress, started, finished, success, result FROM worker_jobs"
                " WHERE id = %s", (job_id,)
            ).fetchone()  # fmt: skip
            assert row is not None
            if row["progress"] is not None and (not seen or seen[-1] != row["progress"]):
                seen.append(row["progress"])
            if row["finished"] is not None:
                return seen, row
            time.sleep(1 / SAMPLE_HZ)
    raise AssertionError(f"job {job_id} did not finish in 60 s")


def check_rate(seen: list[dict[str, Any]], row: dict[str, Any]) -> None:
    seconds = (row["finished"] - row["started"]).total_seconds()
    assert seconds > 1.0, seconds  # long enough for the limit to matter
    most = seconds * MOST_WRITES_PER_SECOND + 2
    assert 3 <= len(seen) <= most, (len(seen), seconds)
    fractions = [value["fraction"] for value in seen]
    assert fractions == sorted(fractions)  # in order, never an older value over a newer one
    assert seen[-1] == row["progress"]
    print(f"{len(seen)} distinct values seen in {seconds:.2f} s")


def test_a_tight_loop_writes_a_few_times_a_second_and_the_last_value_lands(jobs_db: str) -> None:
    job_id = insert(jobs_db, "progressLoop")
    with running(start_worker(jobs_db, **JOBS)) as worker:
        seen, row = sample_progress(jobs_db, job_id)
        assert stop(worker) == 0
    assert row["success"] is True and row["result"] == {"reports": REPORTS}
    check_rate(seen, row)
    last = row["progress"]
    assert (last["fraction"], last["message"], last["data"]) == (
        1.0, f"step {REPORTS - 1}", {"i": REPORTS - 1})  # fmt: skip
    assert isinstance(last["at"], str)


def test_a_plain_def_handler_reports_from_its_thread(jobs_db: str) -> None:
    job_id = insert(jobs_db, "progressSync")
    with running(start_worker(jobs_db, **JOBS)) as worker:
        seen, row = sample_progress(jobs_db, job_id)
        assert stop(worker) == 0
    assert row["success"] is True
    check_rate(seen, row)
    assert (row["progress"]["fraction"], row["progress"]["message"]) == (1.0, "done")


def test_an_invalid_report_fails_only_the_call(jobs_db: str) -> None:
    caught = insert(jobs_db, "progressInvalid")
    uncaught = insert(jobs_db, "progressUncaught")
    with running(start_worker(jobs_db, **JOBS)) as worker:
        wait_for(jobs_db, "SELECT finished FROM worker_jobs WHERE id IN (%s, %s)", all_finished,
                 params=(caught, uncaught))  # fmt: skip
        after = insert(jobs_db, "progressInvalid")  # the worker goes on
        wait_for(jobs_db, "SELECT finished FROM worker_jobs WHERE id = %s", all_finished,
                 params=(after,))  # fmt: skip
        assert stop(worker) == 0
    rows = {r["id"]: r for r in sql(jobs_db, "SELECT * FROM worker_jobs")}
    for job_id in (caught, after):
        assert rows[job_id]["success"] is True
        assert rows[job_id]["result"] == {"errors": ["ValueError", "ValueError", "ValueError",
            "TypeError", "ValueError", "ValueError", "ValueError"]}  # fmt: skip
        assert rows[job_id]["progress"]["fraction"] == 0.25
        assert rows[job_id]["progress"]["message"] == "still going"
    assert rows[uncaught]["success"] is False and rows[uncaught]["progress"] is None
    assert rows[uncaught]["result"]["error_type"] == "ValueError"
    assert "finite number in [0, 1]" in rows[uncaught]["result"]["error"]


def test_a_run_that_lost_its_claim_cannot_write_progress(jobs_db: str) -> None:
    job_id = insert(jobs_db, "progressThenWait", '{"wait": 2.0}')
    # A long lease: the worker does not notice the loss (and stop the run) before it reports.
    with running(start_worker(jobs_db, QDWORKER_LEASE_SECONDS="60", **JOBS)) as worker:
        wait_for(jobs_db, "SELECT progress FROM worker_jobs WHERE id = %s",
                 lambda rows: rows[0]["progress"] is not None, params=(job_id,))  # fmt: skip
        # Another worker rescued the job: a new claim.
        sql(jobs_db, "UPDATE worker_jobs SET claims = claims + 1 WHERE id = %s", (job_id,))
        wait_for(jobs_db, "SELECT * FROM test_runs WHERE job_id = %s", bool, params=(job_id,))
        time.sleep(1.0)  # the run's end wrote its last value now, or never will
        [row] = sql(jobs_db, "SELECT progress, finished FROM worker_jobs WHERE id = %s",
                    (job_id,))  # fmt: skip
        stop(worker)
    assert row["progress"]["fraction"] == 0.1 and row["progress"]["message"] == "before"
    assert row["finished"] is None  # its outcome was fenced off too


def test_the_statement_is_fenced_by_claim_and_owner(sql: psycopg.Connection) -> None:
    [row] = sql.execute(
        "INSERT INTO worker_jobs (type, started, lease_owner, claims) VALUES ('x', now(), 'w1', 3)"
        " RETURNING id"
    ).fetchall()
    job_id, value = row["id"], progress_value(0.5, "half")
    assert write_progress(sql, owner="w1", entries=[(job_id, 2, value)]) == set()  # old claim
    assert write_progress(sql, owner="w2", entries=[(job_id, 3, value)]) == set()  # not ours
    assert sql.execute("SELECT progress FROM worker_jobs").fetchone() == {"progress": None}
    assert write_progress(sql, owner="w1", entries=[(job_id, 3, value)]) == {job_id}
    assert sql.execute("SELECT progress FROM worker_jobs").fetchone() == {"progress": value}
    sql.execute("UPDATE worker_jobs SET finished = now()")
    assert write_progress(sql, owner="w1", entries=[(job_id, 3, progress_value(1.0))]) == set()


@pytest.mark.parametrize("fraction", [0, 1, 0.5, True, -0.0001, 1.0001, float("inf"), None])
def test_progress_value_accepts_numbers_in_the_unit_interval(fraction: Any) -> None:
    if isinstance(fraction, int | float) and not isinstance(fraction, bool) and 0 <= fraction <= 1:
        assert progress_value(fraction)["fraction"] == float(fraction)
    else:
        with pytest.raises((TypeError, ValueError)):
            progress_value(fraction)
