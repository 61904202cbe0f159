"""Retries, cron, cleanup, timeouts and cancellation, end to end with real workers."""

from __future__ import annotations

import itertools
from datetime import timedelta

import trio
from procs import all_finished, running, start_worker, stop, wait_for
from test_worker import JOBS, sql

from qdworker import Queue
from qdworker._schedule import backoff

FAST = {"QDWORKER_LEASE_SECONDS": "1", "QDWORKER_POLL_INTERVAL": "0.5"}


def test_retry_chain_copies_every_field_including_persistent(jobs_db: str) -> None:
    sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, tag, user_id, data, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, max_attempts, persistent, remove_delay)
        VALUES ('boom', 'retry-me', 7, '{"message": "nope"}', true, 100, 3, true, 5000)""",
    )
    with running(start_worker(jobs_db)) as worker:
        rows = wait_for(jobs_db, JOBS, lambda r: len(r) == 3 and all_finished(r))
        assert stop(worker) == 0
    assert [r["attempt"] for r in rows] == [1, 2, 3]
    assert [r["rescheduled_from_job"] for r in rows] == [None, rows[0]["id"], rows[1]["id"]]
    for row in rows:
        assert (
            row["tag"],
            row["user_id"],
            row["data"],
            row["persistent"],
            row["remove_delay"],
        ) == ("retry-me", 7, {"message": "nope"}, True, 5000)
        assert row["success"] is False
    # The job's delay is 100 ms, but retries never come faster than the floor: 1 s after
    # the first attempt, 2 s after the second (qdworker/_schedule/backoff.py).
    for (before, after), floor_ms in zip(itertools.pairwise(rows), (1000, 2000), strict=True):
        assert after["due"] - before["finished"] == timedelta(milliseconds=floor_ms)
    assert "gave_up" not in rows[1]["result"]
    assert rows[2]["result"]["gave_up"] == "attempt 3 of 3 failed: no retries left"


def test_exponential_backoff_doubles_with_jitter(jobs_db: str) -> None:
    sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, max_attempts, backoff)
        VALUES ('boom', true, 1500, 3, 'exponential')""",
    )
    with running(start_worker(jobs_db)) as worker:
        rows = wait_for(jobs_db, JOBS, lambda r: len(r) == 3 and all_finished(r))
        assert stop(worker) == 0
    for attempt, (before, after) in enumerate(itertools.pairwise(rows), start=1):
        ceiling = timedelta(milliseconds=1500 * 2 ** (attempt - 1))
        floor = timedelta(milliseconds=backoff.floor_ms(attempt))
        assert max(ceiling / 2, floor) <= after["due"] - before["finished"] <= max(ceiling, floor)


def test_job_that_kills_its_worker_is_stopped_by_max_attempts(jobs_db: str) -> None:
    [job] = sql(
        jobs_db, "INSERT INTO worker_jobs (type, max_attempts) VALUES ('exit', 2) RETURNING id"
    )
    for _ in range(2):
        proc = start_worker(jobs_db, **FAST)
        assert proc.wait(timeout=30) == 17
    with running(start_worker(jobs_db, **FAST)) as worker:
        [row] = wait_for(jobs_db, JOBS, all_finished)
        assert stop(worker) == 0
    assert row["id"] == job["id"] and row["success"] is False
    assert row["result"]["error_type"] == "WorkerLost"
    assert row["attempt"] == 3 and row["lost_runs"] == 2
    assert len(sql(jobs_db, "SELECT * FROM test_runs")) == 2


def test_six_field_cron_runs_each_second_without_drift(jobs_db: str) -> None:
    sql(
        jobs_db,
        "INSERT INTO worker_jobs (type, tag, cron_schedule) VALUES ('noop', 'cron:tick', '*/1 * * * * *')",
    )
    with running(start_worker(jobs_db)) as worker:
        rows = wait_for(jobs_db, JOBS, lambda r: len([x for x in r if x["finished"]]) >= 4)
        assert stop(worker) == 0
    runs = [r for r in rows if r["finished"] is not None][1:4]  # ticks after the first
    for row in runs:
        assert row["due"].microsecond == 0 and row["success"] is True
    for before, after in itertools.pairwise(runs):
        assert after["due"] - before["due"] == timedelta(seconds=1)
        assert after["rescheduled_from_job"] == before["id"]
    pending = [r for r in rows if r["finished"] is None]
    assert len(pending) <= 1


def test_cron_after_downtime_skips_missed_ticks_and_failures_keep_the_chain(jobs_db: str) -> None:
    sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, tag, cron_schedule, due) VALUES
        ('noop', 'cron:minutely', '* * * * *', now() - interval '10 minutes'),
        ('boom', 'cron:failing', '*/1 * * * * *', now() - interval '1 hour')""",
    )
    with running(start_worker(jobs_db)) as worker:
        rows = wait_for(jobs_db, JOBS, lambda r: len(r) >= 4)
        assert stop(worker) == 0
    by_tag = {}
    for row in rows:
        by_tag.setdefault(row["tag"], []).append(row)
    first, nxt = by_tag["cron:minutely"][:2]
    assert nxt["due"] > first["finished"]  # no pile-up: the missed ticks are skipped
    assert nxt["due"] - first["finished"] <= timedelta(minutes=1)
    assert nxt["due"].second == 0 and nxt["due"].microsecond == 0
    failed, again = by_tag["cron:failing"][:2]
    assert failed["success"] is False and again["rescheduled_from_job"] == failed["id"]


def test_invalid_cron_from_sql_fails_with_reason(jobs_db: str) -> None:
    sql(jobs_db, "INSERT INTO worker_jobs (type, cron_schedule) VALUES ('noop', '61 * * * *')")
    with running(start_worker(jobs_db)) as worker:
        [row] = wait_for(jobs_db, JOBS, all_finished)
        assert stop(worker) == 0
    assert row["success"] is False and "invalid cron_schedule" in row["result"]["error"]


def test_cleanup_respects_persistent_and_remove_at(jobs_db: str) -> None:
    sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, finished, success, due, persistent) VALUES
        ('old', now(), true, now() - interval '2 hours', false),
        ('old', now(), false, now() - interval '3 hours', false),
        ('keep', now(), true, now() - interval '2 hours', true),
        ('young', now(), true, now(), false),
        ('pending', NULL, NULL, now() + interval '1 day', false)""",
    )
    sql(jobs_db, "INSERT INTO worker_jobs (type) SELECT 'old' FROM generate_series(1, 2500)")
    sql(
        jobs_db,
        "UPDATE worker_jobs SET finished = now(), success = true, due = now() - interval '2 hours', remove_at = now() - interval '1 hour' WHERE type = 'old' AND finished IS NULL",
    )
    [job] = sql(
        jobs_db, "INSERT INTO worker_jobs (type) VALUES ('removeOldWorkerJobs') RETURNING id"
    )
    with running(start_worker(jobs_db)) as worker:
        wait_for(
            jobs_db, "SELECT * FROM worker_jobs WHERE id = %s", all_finished, params=(job["id"],)
        )
        assert stop(worker) == 0
    left = sorted(r["type"] for r in sql(jobs_db, "SELECT type FROM worker_jobs"))
    assert left == ["keep", "pending", "removeOldWorkerJobs", "young"]
    [cleanup] = sql(jobs_db, "SELECT result FROM worker_jobs WHERE id = %s", (job["id"],))
    assert cleanup["result"] == {"deleted": 2502}


def test_timeout_fails_the_job(jobs_db: str) -> None:
    sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, data, timeout_seconds)
        VALUES ('sleep', '{"seconds": 30}', 0.5)""",
    )
    with running(start_worker(jobs_db)) as worker:
        [row] = wait_for(jobs_db, JOBS, all_finished)
        assert stop(worker) == 0
    assert row["result"] == {"error": "timed out after 0.5 s", "error_type": "JobTimeout"}


def test_handler_blocking_the_loop_is_stopped_and_others_released(jobs_db: str) -> None:
    sql(jobs_db, "INSERT INTO worker_jobs (type, data) VALUES ('sleep', '{\"seconds\": 60}')")
    worker = start_worker(jobs_db, **FAST)
    with running(worker):
        wait_for(jobs_db, "SELECT * FROM test_runs", lambda r: len(r) == 1)
        [stuck] = sql(
            jobs_db,
            "INSERT INTO worker_jobs (type, data) VALUES ('blockLoop', '{\"seconds\": 30}') RETURNING id",
        )
        assert worker.wait(timeout=20) == 3
    rows = {r["type"]: r for r in sql(jobs_db, JOBS)}
    assert rows["blockLoop"]["id"] == stuck["id"] and rows["blockLoop"]["success"] is False
    assert rows["blockLoop"]["result"]["error_type"] == "JobTimeout"
    assert rows["sleep"]["started"] is None and rows["sleep"]["finished"] is None  # released


def test_handler_thread_ignoring_cancellation_replaces_the_worker(jobs_db: str) -> None:
    worker = start_worker(jobs_db, **FAST)
    with running(worker):
        sql(
            jobs_db,
            "INSERT INTO worker_jobs (type, data) VALUES ('blockThread', '{\"seconds\": 30}')",
        )
        assert worker.wait(timeout=20) == 3
    [row] = sql(jobs_db, JOBS)
    assert row["success"] is False and row["result"]["error"] == "timed out after 1 s"


async def test_cancel_pending_and_running_jobs(jobs_db: str) -> None:
    async with Queue(jobs_db) as queue:
        pending = await queue.submit_job(type="noop", due=timedelta(hours=1))
        assert await queue.cancel_job(pending.id, "not needed") == "cancelled"
        assert await queue.cancel_job(pending.id) == "finished"
        assert await queue.cancel_job(10**12) == "not_found"
        with running(start_worker(jobs_db)) as worker:
            job = await queue.submit_job(type="sleep", data={"seconds": 60})
            await trio.to_thread.run_sync(
                wait_for, jobs_db, "SELECT * FROM test_runs", lambda r: len(r) == 1
            )
            assert await queue.cancel_job(job.id, "user asked") == "cancelling"
            with trio.fail_after(5):
                rows = await trio.to_thread.run_sync(
                    lambda: wait_for(
                        jobs_db,
                        "SELECT * FROM worker_jobs WHERE id = %s",
                        all_finished,
                        params=(job.id,),
                    )
                )
            assert await trio.to_thread.run_sync(stop, worker) == 0
    assert rows[0]["result"] == {"error": "Job cancelled: user asked", "error_type": "JobCancelled"}
    assert rows[0]["finished"] - rows[0]["cancel_requested_at"] < timedelta(seconds=1)
    done = await queue_job(jobs_db, pending.id)
    assert done["result"]["error"] == "Job cancelled: not needed"


async def queue_job(db_url: str, job_id: int) -> dict[str, object]:
    return sql(db_url, "SELECT * FROM worker_jobs WHERE id = %s", (job_id,))[0]
