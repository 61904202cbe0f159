"""Dead letters end to end with real worker processes: which failures the completer marks
dead, a redriven job running again as a new attempt, and cleanup's retention of dead rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from procs import all_finished, running, start_worker, stop, wait_for
from test_worker import JOBS, sql

from qdworker import Queue

OUTCOMES = """INSERT INTO worker_jobs (type, tag, data, auto_reschedule_on_failure,
    auto_reschedule_on_failure_delay, max_attempts, cron_schedule, timeout_seconds) VALUES
    ('boom', 'plain', '{}', false, 0, NULL, NULL, NULL),
    ('boom', 'chain', '{}', true, 0, 2, NULL, NULL),
    ('boom', 'cron:fail', '{}', false, 0, NULL, '*/1 * * * * *', NULL),
    ('sleep', 'timeout', '{"seconds": 30}', false, 0, NULL, NULL, 0.3),
    ('noop', 'ok', '{}', false, 0, NULL, NULL, NULL)"""


def _by_tag(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        found.setdefault(row["tag"], []).append(row)
    return found


def _settled(rows: list[dict[str, Any]]) -> bool:
    tags = _by_tag(rows)
    chain = tags.get("chain", [])
    firsts = [tags[tag][0] for tag in ("plain", "cron:fail", "timeout", "ok", "cancel-me")]
    return len(chain) == 2 and all_finished(chain) and all_finished(firsts)


def test_only_final_failures_are_dead(jobs_db: str) -> None:
    sql(jobs_db, OUTCOMES)
    # Cancelled while pending, and replaced by a newer job of its tag (QuickDapp's rule).
    sql(jobs_db, "INSERT INTO worker_jobs (type, tag, due) VALUES ('noop', 'pending', now() + interval '1 hour'), ('noop', 'replaced', now() + interval '1 hour'), ('noop', 'replaced', now() + interval '1 hour')")  # fmt: skip
    sql(jobs_db, "SELECT qdworker_cancel_job(id) FROM worker_jobs WHERE tag = 'pending'")
    [running_job] = sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, tag, data) VALUES ('sleep', 'cancel-me',
        '{"seconds": 60}') RETURNING id""",
    )
    with running(start_worker(jobs_db)) as worker:
        wait_for(jobs_db, "SELECT 1 FROM test_runs WHERE job_id = %s", bool,
                 params=(running_job["id"],))  # fmt: skip
        sql(jobs_db, "SELECT qdworker_cancel_job(%s)", (running_job["id"],))
        rows = wait_for(jobs_db, JOBS, _settled)
        assert stop(worker) == 0
    tags = _by_tag(rows)
    dead = {(r["tag"], r["attempt"]) for r in rows if r["dead_at"] is not None}
    # The chain's last attempt (no retries left), the failure with retries off, the timeout.
    assert dead == {("chain", 2), ("plain", 1), ("timeout", 1)}
    assert tags["chain"][1]["result"]["gave_up"] == "attempt 2 of 2 failed: no retries left"
    assert tags["chain"][0]["success"] is False  # failed, but retried: not dead
    assert tags["cron:fail"][0]["success"] is False  # its next tick is scheduled: not dead
    assert tags["timeout"][0]["result"]["error_type"] == "JobTimeout"
    for tag in ("pending", "replaced", "cancel-me"):
        assert tags[tag][0]["success"] is False and tags[tag][0]["dead_at"] is None, tag
    assert all(r["dead_at"] == r["finished"] for r in rows if r["dead_at"] is not None)


async def test_redriven_dead_jobs_run_again_as_new_attempts(jobs_db: str) -> None:
    sql(
        jobs_db,
        """INSERT INTO worker_jobs (type, auto_reschedule_on_failure, max_attempts)
        VALUES ('boom', true, 1)""",
    )
    with running(start_worker(jobs_db, QDWORKER_POLL_INTERVAL="30")) as worker:
        [first] = wait_for(jobs_db, JOBS, lambda rows: rows[0]["dead_at"] is not None)
        async with Queue(jobs_db) as queue:
            [again] = await queue.retry_dead(type="boom")
            assert again.rescheduled_from_job == first["id"]
        rows = wait_for(jobs_db, JOBS, lambda rows: len(rows) == 2 and all_finished(rows))
        assert stop(worker) == 0
    old, new = rows
    assert old["dead_at"] is None and old["success"] is False  # redriven: not dead any more
    # The new attempt had one more try (max_attempts 1 + 1 spent), used it, and died.
    assert (new["attempt"], new["max_attempts"], new["success"]) == (2, 2, False)
    assert new["dead_at"] is not None and new["rescheduled_from_job"] == old["id"]
    # Woken by the insert's NOTIFY, not by the 30 s poll.
    assert new["started"] - new["created_at"] < timedelta(seconds=10)


CLEANUP_ROWS = """INSERT INTO worker_jobs (type, finished, success, dead_at, remove_at) VALUES
    ('deadRecent', now(), false, now() - interval '10 minutes', now() - interval '1 minute'),
    ('deadOld', now(), false, now() - interval '2 hours', now() - interval '1 minute'),
    ('deadYoung', now(), false, now(), now() + interval '1 hour'),
    ('retried', now(), false, NULL, now() - interval '1 minute'),
    ('succeeded', now(), true, NULL, now() - interval '1 minute')"""


@pytest.mark.parametrize(
    ("retention", "left"),
    [
        ({"QDWORKER_DEAD_JOB_RETENTION": "3600"}, ["deadRecent", "deadYoung"]),
        ({}, ["deadYoung"]),  # the default, 0: dead rows go at remove_at like the others
    ],
)
def test_cleanup_keeps_dead_jobs_for_the_retention(
    jobs_db: str, retention: dict[str, str], left: list[str]
) -> None:
    sql(jobs_db, CLEANUP_ROWS)
    [job] = sql(
        jobs_db, "INSERT INTO worker_jobs (type) VALUES ('removeOldWorkerJobs') RETURNING id"
    )
    with running(start_worker(jobs_db, **retention)) as worker:
        [done] = wait_for(jobs_db, "SELECT * FROM worker_jobs WHERE id = %s", all_finished,
                          params=(job["id"],))  # fmt: skip
        assert stop(worker) == 0
    assert done["success"] is True, done["result"]
    types = sorted(r["type"] for r in sql(jobs_db, "SELECT type FROM worker_jobs"))
    assert types == sorted([*left, "removeOldWorkerJobs"])
