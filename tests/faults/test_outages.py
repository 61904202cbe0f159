"""Faults 2 and 3: Postgres away for longer than a lease while handlers keep running, and
qdworker's backends terminated, one kind at a time and all at once, during a drain."""

from __future__ import annotations

import time
from pathlib import Path

from chaos import (
    FAULT_SETTINGS,
    eventually,
    finished,
    insert_chaos,
    log_lines,
    outcome_summary,
    query,
)
from procs import running, start_supervisor, stop
from runs import overlapping, read_runs, runs_per_job

from qdworker.testing import PostgresServer, terminate_backends, worker_pids

LEASE_SECONDS = 2.0
#: The connections every worker process holds.
PER_WORKER = ("qdworker-claim", "qdworker-complete", "qdworker-leases", "qdworker-listen")


def test_outage_of_three_leases_while_handlers_keep_running(
    pg: PostgresServer, pg_db: str, runs_file: Path, tmp_path: Path
) -> None:
    """The server stops for 3 x the lease under two supervisors. Handlers that need no
    database run on (even those longer than the lease), their outcomes wait in memory and are
    written once it is back; neither supervisor rescues the other's runs meanwhile: each job
    ran once, none failed, none counts as a lost run."""
    insert_chaos(pg_db, 20, seconds=1.0)  # finish during the outage
    insert_chaos(pg_db, 20, seconds=5.0)  # outlive a lease during the outage
    log = tmp_path / "supervisors.log"
    settings = {
        **FAULT_SETTINGS,
        "WORKER_COUNT": "1",
        "QDWORKER_LEASE_SECONDS": str(LEASE_SECONDS),
        "QDWORKER_CONCURRENCY": "25",
        "QDTEST_RUNS_FILE": str(runs_file),
    }
    with (
        running(start_supervisor(pg_db, log=log, **settings)) as a,
        running(start_supervisor(pg_db, log=log, **settings)) as b,
    ):
        eventually(
            pg_db,
            "SELECT count(*) AS n, count(DISTINCT lease_owner) AS owners FROM worker_jobs"
            " WHERE started IS NOT NULL AND type = 'chaos'",
            lambda rows: rows[0]["n"] == 40 and rows[0]["owners"] == 2,
        )
        workers = {*worker_pids(a.pid), *worker_pids(b.pid)}
        outage_start = time.time()
        with pg.down("fast"):
            time.sleep(3 * LEASE_SECONDS)  # the outage itself, not synchronisation
        finished(pg_db, 40)
        assert {*worker_pids(a.pid), *worker_pids(b.pid)} == workers  # no worker exited
        assert stop(a) == 0 and stop(b) == 0
    assert outcome_summary(pg_db) == {
        "jobs": 40, "succeeded": 40, "unfinished": 0, "lost_runs": 0, "max_attempt": 1,
    }  # fmt: skip
    runs = read_runs(runs_file)
    assert overlapping(runs) == []
    assert set(runs_per_job(runs).values()) == {1}
    # the long handlers really ran through the outage
    long_runs = [r for r in runs if r.end is not None and r.end - r.start > 4]
    assert len(long_runs) == 20
    assert all(r.start < outage_start < r.end for r in long_runs)
    assert log_lines(log, "lease could not be renewed") == []
    assert len(log_lines(log, "database unreachable")) <= 4  # 2 supervisors + 2 workers


def test_backends_terminated_during_a_drain(
    pg: PostgresServer, pg_db: str, runs_file: Path, tmp_path: Path
) -> None:
    """Every kind of qdworker connection terminated in turn, then all at once: the same
    guarantees as a restart."""
    jobs = 5000
    insert_chaos(pg_db, jobs, seconds=0.02)
    log = tmp_path / "supervisors.log"
    settings = {**FAULT_SETTINGS, "QDTEST_RUNS_FILE": str(runs_file)}
    kinds = [
        "qdworker-claim", "qdworker-complete", "qdworker-leases", "qdworker-listen",
        "qdworker-relay-%", "qdworker-maintenance", "qdworker-supervisor",
    ]  # fmt: skip
    terminated: dict[str, int] = {}
    with (
        running(start_supervisor(pg_db, log=log, **settings)) as a,
        running(start_supervisor(pg_db, log=log, **settings)) as b,
    ):
        finished(pg_db, 200)
        workers = {*worker_pids(a.pid), *worker_pids(b.pid)}
        for kind in kinds:
            if kind in PER_WORKER:  # each worker has (again) a connection of this kind
                eventually(pg_db, "SELECT count(*) AS n FROM pg_stat_activity"
                           f" WHERE application_name = '{kind}'",
                           lambda rows: rows[0]["n"] == 4, timeout=10)  # fmt: skip
            terminated[kind] = terminate_backends(pg_db, application_name=kind)
            done = query(pg_db, "SELECT count(*) AS n FROM worker_jobs WHERE finished IS NOT NULL")
            finished(pg_db, done[0]["n"] + 100)  # progress between two faults
        terminated["all"] = terminate_backends(pg_db)
        finished(pg_db, jobs, timeout=120)
        assert {*worker_pids(a.pid), *worker_pids(b.pid)} == workers
        # LISTEN came back everywhere: a new job is woken at once (the poll is 30 s).
        eventually(
            pg_db,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'qdworker-listen'",
            lambda rows: rows[0]["n"] == 4,
        )
        [job] = query(pg_db, "INSERT INTO worker_jobs (type) VALUES ('chaos') RETURNING id")
        eventually(
            pg_db,
            f"SELECT 1 FROM worker_jobs WHERE id = {job['id']} AND finished IS NOT NULL",
            lambda rows: len(rows) == 1,
            timeout=5,
        )
        assert stop(a) == 0 and stop(b) == 0
    print("terminated:", terminated)
    for kind in PER_WORKER:
        assert terminated[kind] == 4, terminated  # one per worker
    assert terminated["all"] >= 10  # every connection open at that moment
    assert outcome_summary(pg_db) == {
        "jobs": jobs + 1, "succeeded": jobs + 1, "unfinished": 0, "lost_runs": 0,
        "max_attempt": 1,
    }  # fmt: skip
    runs = read_runs(runs_file)
    assert overlapping(runs) == []
    assert set(runs_per_job(runs).values()) == {1}
    assert not log_lines(log, "Traceback")
