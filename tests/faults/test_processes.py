"""Faults 6 and 7, and process identity: workers SIGKILLed again and again through a drain, a
SIGKILLed supervisor, a supervisor restarted in a container (same host name, same pid), and
SIGTERM timed into a busy claim loop."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chaos import (
    FAULT_SETTINGS,
    eventually,
    finished,
    insert_chaos,
    outcome_summary,
    query,
)
from procs import env_for, running, start_supervisor, start_worker, stop
from runs import overlapping, read_runs

from qdworker.testing import kill_worker, worker_pids


def test_workers_killed_every_two_seconds_through_a_drain(
    pg_db: str, runs_file: Path, tmp_path: Path
) -> None:
    jobs = 10_000
    insert_chaos(pg_db, jobs, seconds=0.05)
    settings = {
        **FAULT_SETTINGS,
        "QDWORKER_MAX_LOST_RUNS": "1000",  # a job lost again and again still runs, not fails
        "QDTEST_RUNS_FILE": str(runs_file),
    }
    deaths: dict[int, float] = {}
    rng = random.Random(42)
    log = tmp_path / "supervisors.log"
    with (
        running(start_supervisor(pg_db, log=log, **settings)) as a,
        running(start_supervisor(pg_db, log=log, **settings)) as b,
    ):
        finished(pg_db, 200)
        while outcome_summary(pg_db)["unfinished"] > 0:
            supervisor = rng.choice((a, b))
            pid = kill_worker(supervisor.pid, rng=rng)
            if pid is not None:
                deaths[pid] = time.time()
            time.sleep(2)  # the fault's cadence, not synchronisation
        assert stop(a) == 0 and stop(b) == 0
    print(f"{len(deaths)} workers killed")
    assert len(deaths) >= 3
    summary = outcome_summary(pg_db)
    assert (summary["jobs"], summary["succeeded"], summary["unfinished"]) == (jobs, jobs, 0)
    assert summary["lost_runs"] > 0  # the kills did hit running jobs
    runs = read_runs(runs_file)
    assert overlapping(runs, deaths) == []
    # Every job's stored outcome came from its last run: a stale completion never won.
    rows = query(pg_db, "SELECT id, claims FROM worker_jobs WHERE type = 'chaos'")
    last_claims: dict[int, int] = {}
    for run in runs:
        last_claims[run.job_id] = max(last_claims.get(run.job_id, 0), run.claims)
    assert all(row["claims"] == last_claims[row["id"]] for row in rows)


def test_supervisor_killed_its_workers_exit_and_another_finishes_every_job(
    pg_db: str, runs_file: Path, tmp_path: Path
) -> None:
    insert_chaos(pg_db, 400, seconds=0.5)
    settings = {**FAULT_SETTINGS, "QDTEST_RUNS_FILE": str(runs_file)}
    with running(start_supervisor(pg_db, **settings)) as b:
        with running(start_supervisor(pg_db, **settings)) as a:
            eventually(
                pg_db,
                "SELECT count(DISTINCT lease_owner) AS n FROM worker_jobs"
                " WHERE started IS NOT NULL AND finished IS NULL",
                lambda rows: rows[0]["n"] == 4,
            )
            orphans = worker_pids(a.pid)
            a.send_signal(signal.SIGKILL)
            a.wait()
            killed = time.time()
        deadline = killed + 5  # they notice the socket close at once: 5 s is a wide margin
        while any(_alive(pid) for pid in orphans) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in orphans), "workers outlived their supervisor"
        finished(pg_db, 400, timeout=120)
        assert stop(b) == 0
    summary = outcome_summary(pg_db)
    assert (summary["jobs"], summary["succeeded"], summary["unfinished"]) == (400, 400, 0)
    assert overlapping(read_runs(runs_file)) == []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to make a PID and UTS namespace",
)
def test_supervisor_restarted_in_a_new_pid_namespace_does_not_take_its_dead_predecessors_id(
    pg_db: str, runs_file: Path
) -> None:
    """In a container restart the host name survives and the supervisor is pid 1 again: the
    restarted worker must not take its predecessor's expired leases for its own."""
    container = [
        "unshare", "--pid", "--uts", "--fork", "--kill-child", "sh", "-c",
        f"hostname qdcontainer && exec {sys.executable} -m qdworker",
    ]  # fmt: skip
    env = env_for(
        pg_db, WORKER_COUNT="1", QDWORKER_LEASE_SECONDS="2", QDTEST_RUNS_FILE=str(runs_file)
    )
    [job] = query(
        pg_db,
        "INSERT INTO worker_jobs (type, data) VALUES ('chaos', '{\"seconds\": 600}') RETURNING id",
    )
    with running(subprocess.Popen(container, env=env)) as first:
        [row] = eventually(
            pg_db,
            f"SELECT lease_owner FROM worker_jobs WHERE id = {job['id']} AND started IS NOT NULL",
            lambda rows: len(rows) == 1,
        )
        assert row["lease_owner"].startswith("qdcontainer:1:")
        first.kill()  # the namespace's pid 1 dies with it: every process in it is killed
        first.wait()
    query(pg_db, f"UPDATE worker_jobs SET data = '{{\"seconds\": 0}}' WHERE id = {job['id']}")
    with running(subprocess.Popen(container, env=env)) as second:
        [done] = eventually(
            pg_db,
            f"SELECT attempt, lost_runs, success FROM worker_jobs WHERE id = {job['id']}"
            " AND finished IS NOT NULL",
            lambda rows: len(rows) == 1,
            timeout=30,  # the lease is 2 s: rescued within a few seconds, never if the id repeats
        )
        # unshare does not pass signals on: SIGTERM the supervisor (the namespace's pid 1).
        [supervisor] = worker_pids(second.pid)
        os.kill(supervisor, signal.SIGTERM)
        assert second.wait(timeout=20) == 0
    assert done == {"attempt": 2, "lost_runs": 1, "success": True}


def test_sigterm_during_busy_claiming_leaves_nothing_leased(pg_db: str) -> None:
    """SIGTERM while the worker claims as fast as it can (no-op jobs): every job it holds when
    it exits is given back at once, none stays leased for a lease period."""
    for _ in range(3):
        query(pg_db, "INSERT INTO worker_jobs (type) SELECT 'noop' FROM generate_series(1, 20000)")
        with running(start_worker(pg_db, QDWORKER_LEASE_SECONDS="600")) as worker:
            eventually(
                pg_db,
                "SELECT count(*) AS n FROM worker_jobs WHERE finished IS NOT NULL",
                lambda rows: rows[0]["n"] >= 1000,
            )
            assert stop(worker) == 0
        [held] = query(
            pg_db,
            "SELECT count(*) AS n FROM worker_jobs WHERE started IS NOT NULL AND finished IS NULL",
        )
        assert held["n"] == 0
        query(pg_db, "DELETE FROM worker_jobs")
