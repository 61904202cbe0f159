"""Each run's figures on its row (migration 0009): how it ended, wall and CPU time, peak RSS,
the signal that killed its worker; real worker processes, real Postgres."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from procs import all_finished, running, start_supervisor, start_worker, stop, wait_for
from psycopg.rows import dict_row

MIB = 1024 * 1024
README = Path(__file__).resolve().parents[2] / "README.rst"
#: One job at a time, so that every run is alone in its process (its CPU figure is exact).
ALONE = {"QDWORKER_CONCURRENCY": "1", "QDWORKER_POLL_INTERVAL": "0.5"}
FIGURES = (
    "SELECT id, type, success, run_outcome, run_wall_ms, run_cpu_ms, run_cpu_shared,"
    " run_peak_rss_bytes, lost_signal, lost_runs, claims, finished FROM worker_jobs ORDER BY id"
)


def sql(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def by_id(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {row["id"]: row for row in rows}


def insert(
    db_url: str,
    job_type: str,
    data: str = "{}",
    timeout: float | None = None,
    queue: str = "default",
) -> int:
    [row] = sql(
        db_url,
        "INSERT INTO worker_jobs (type, data, timeout_seconds, queue) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (job_type, data, timeout, queue),
    )
    return int(row["id"])


#: Both claims: the plain one, and that of a limited queue (qdworker_claim_queue).
QUEUES = pytest.mark.parametrize("queue", ["default", "limited"])


def limit(db_url: str, queue: str) -> None:
    if queue == "limited":
        sql(db_url, "INSERT INTO worker_queues (name, concurrency) VALUES ('limited', 5)")


def test_endings_and_cpu_of_runs_alone(jobs_db: str) -> None:
    returned = insert(jobs_db, "noop")
    raised = insert(jobs_db, "boom")
    bad = insert(jobs_db, "badResult")  # returned, but failed: success says so
    timed_out = insert(jobs_db, "sleep", '{"seconds": 5}', timeout=0.3)
    burn = insert(jobs_db, "burnCpu", '{"seconds": 0.5}')
    sleeper = insert(jobs_db, "sleep", '{"seconds": 0.5}')
    with running(start_worker(jobs_db, **ALONE)) as worker:
        rows = by_id(wait_for(jobs_db, FIGURES, all_finished))
        cancelled = insert(jobs_db, "sleep", '{"seconds": 60}')
        wait_for(jobs_db, "SELECT * FROM test_runs WHERE job_id = %s", bool, params=(cancelled,))
        sql(jobs_db, "SELECT qdworker_cancel_job(%s, 'test')", (cancelled,))
        rows.update(by_id(wait_for(jobs_db, FIGURES, all_finished)))
        assert stop(worker) == 0
    outcomes = {i: (rows[i]["run_outcome"], rows[i]["success"]) for i in rows}
    assert outcomes == {
        returned: ("returned", True),
        raised: ("raised", False),
        bad: ("returned", False),
        timed_out: ("timed_out", False),
        burn: ("returned", True),
        sleeper: ("returned", True),
        cancelled: ("cancelled", False),
    }
    assert 290 <= rows[timed_out]["run_wall_ms"] < 3000
    assert not any(row["run_cpu_shared"] for row in rows.values())
    # Alone in its process, a job that burns CPU shows CPU time close to its wall time; one
    # that sleeps shows little.
    assert 450 <= rows[burn]["run_cpu_ms"] <= rows[burn]["run_wall_ms"] * 1.1
    assert rows[burn]["run_cpu_ms"] >= 0.8 * rows[burn]["run_wall_ms"]
    assert rows[sleeper]["run_wall_ms"] >= 490
    assert rows[sleeper]["run_cpu_ms"] < 0.3 * rows[sleeper]["run_wall_ms"]
    assert all(row["run_peak_rss_bytes"] > 10 * MIB for row in rows.values())
    assert all(row["lost_signal"] is None for row in rows.values())


def test_overlapping_runs_are_flagged_shared(jobs_db: str) -> None:
    ids = [insert(jobs_db, "sleep", '{"seconds": 0.5}') for _ in range(2)]
    with running(start_worker(jobs_db, QDWORKER_CONCURRENCY="2")) as worker:
        rows = by_id(wait_for(jobs_db, FIGURES, all_finished))
        assert stop(worker) == 0
    assert [rows[i]["run_cpu_shared"] for i in ids] == [True, True]


def test_peak_rss_of_a_job_that_allocates(jobs_db: str) -> None:
    small = insert(jobs_db, "noop")
    first = insert(jobs_db, "allocate", '{"mb": 120, "hold": 0.5}')
    # The second one does not raise the process's lifetime peak: the sampler catches it.
    second = insert(jobs_db, "allocate", '{"mb": 120, "hold": 0.5}')
    after = insert(jobs_db, "noop")
    with running(start_worker(jobs_db, **ALONE)) as worker:
        rows = by_id(wait_for(jobs_db, FIGURES, all_finished))
        assert stop(worker) == 0
    base = rows[small]["run_peak_rss_bytes"]
    assert rows[first]["run_peak_rss_bytes"] >= base + 100 * MIB
    assert rows[second]["run_peak_rss_bytes"] >= base + 100 * MIB
    # The memory went back: the next run's peak is near where it was before.
    assert rows[after]["run_peak_rss_bytes"] < base + 50 * MIB
    # README's queries find the type that pushed the memory up, and sum the time.
    [pushers] = sql(jobs_db, readme_query("-- The job types whose runs push"))
    assert (pushers["type"], pushers["runs"]) == ("allocate", 2)
    by_type = {r["type"]: r for r in sql(jobs_db, readme_query("-- Where the time goes"))}
    assert by_type["allocate"]["runs"] == 2 and by_type["allocate"]["wall_ms"] >= 500


def readme_query(first_line: str) -> str:
    """The SQL statement of README.rst that starts with ``first_line``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(first_line)
    return text[start : text.index(";", start)]


@QUEUES
def test_worker_killed_by_a_signal_is_recorded_on_the_rescued_row(
    jobs_db: str, tmp_path: Path, queue: str
) -> None:
    limit(jobs_db, queue)
    pid_file = tmp_path / "pid"
    data = f'{{"pid_file": "{pid_file}", "seconds": 60}}'
    job_id = insert(jobs_db, "pidSleep", data, queue=queue)
    settings = {"WORKER_COUNT": "1", "QDWORKER_SHUTDOWN_TIMEOUT": "1", **ALONE}
    with running(start_supervisor(jobs_db, **settings)) as supervisor:
        one = f"SELECT * FROM ({FIGURES}) AS f WHERE id = {job_id}"
        wait_for(jobs_db, one, lambda rows: pid_file.exists() and rows[0]["claims"] == 1)
        first_pid = int(pid_file.read_text())
        pid_file.unlink()
        os.kill(first_pid, signal.SIGKILL)
        # The supervisor ends the lease at once; the restarted worker rescues the job.
        [row] = wait_for(jobs_db, one, lambda rows: rows[0]["claims"] == 2)
        assert (row["run_outcome"], row["lost_signal"], row["lost_runs"]) == ("lost", "SIGKILL", 1)
        assert row["run_wall_ms"] > 0 and row["run_cpu_ms"] is None
        assert row["finished"] is None  # it runs again
        assert stop(supervisor) == 0


@QUEUES
def test_run_lost_by_lease_expiry_records_no_signal(jobs_db: str, queue: str) -> None:
    limit(jobs_db, queue)
    settings = {**ALONE, "QDWORKER_LEASE_SECONDS": "1", "QDWORKER_SHUTDOWN_TIMEOUT": "1"}
    job_id = insert(jobs_db, "sleep", '{"seconds": 60}', queue=queue)
    with running(start_worker(jobs_db, **settings)) as first:
        wait_for(jobs_db, "SELECT * FROM test_runs", lambda rows: len(rows) == 1)
        first.send_signal(signal.SIGKILL)
        first.wait()
    with running(start_worker(jobs_db, **settings)) as second:
        [row] = wait_for(jobs_db, FIGURES, lambda rows: rows[0]["claims"] == 2)
        assert stop(second) == 0
    assert row["id"] == job_id
    assert (row["run_outcome"], row["lost_signal"], row["lost_runs"]) == ("lost", None, 1)
    assert row["run_wall_ms"] is None


def test_shutdown_gives_back_a_run_as_preempted(jobs_db: str) -> None:
    job_id = insert(jobs_db, "sleep", '{"seconds": 60}')
    with running(start_worker(jobs_db, **ALONE, QDWORKER_SHUTDOWN_TIMEOUT="0.5")) as worker:
        wait_for(jobs_db, "SELECT * FROM test_runs", lambda rows: len(rows) == 1)
        assert stop(worker) == 0
    [row] = sql(jobs_db, FIGURES)
    assert row["id"] == job_id and row["finished"] is None
    assert row["run_outcome"] == "preempted" and row["run_wall_ms"] >= 400
