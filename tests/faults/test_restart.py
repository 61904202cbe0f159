"""Fault 1: Postgres restarted (``-m fast``, then ``-m immediate``) twice during a drain by
2 supervisors x 2 workers: every job succeeds, none runs twice, no worker exits, nothing is
counted as a lost run, and NOTIFY works again right after."""

from __future__ import annotations

from pathlib import Path

import trio
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
from psycopg.conninfo import conninfo_to_dict
from runs import overlapping, read_runs, runs_per_job

from qdworker._db.connect import DbOptions
from qdworker._worker.claimer import Claimer
from qdworker._worker.flow import Flow
from qdworker.testing import PostgresServer, worker_pids

JOBS = 5000


def test_postgres_restarts_twice_during_a_drain(
    pg: PostgresServer, pg_db: str, runs_file: Path, tmp_path: Path
) -> None:
    insert_chaos(pg_db, JOBS, seconds=0.02)
    log = tmp_path / "supervisors.log"
    settings = {**FAULT_SETTINGS, "QDTEST_RUNS_FILE": str(runs_file)}
    with (
        running(start_supervisor(pg_db, log=log, **settings)) as a,
        running(start_supervisor(pg_db, log=log, **settings)) as b,
    ):
        finished(pg_db, 500)
        workers = {*worker_pids(a.pid), *worker_pids(b.pid)}
        assert len(workers) == 4
        pg.restart("fast")
        finished(pg_db, 2500)
        pg.restart("immediate")
        finished(pg_db, JOBS, timeout=120)
        # No worker process exited: the same four are still there.
        assert {*worker_pids(a.pid), *worker_pids(b.pid)} == workers
        # LISTEN is back on every worker; a new job is woken by NOTIFY (the poll is 30 s).
        eventually(
            pg_db,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'qdworker-listen'",
            lambda rows: rows[0]["n"] == 4,
        )
        [job] = query(pg_db, "INSERT INTO worker_jobs (type) VALUES ('chaos') RETURNING id")
        [row] = eventually(
            pg_db,
            f"SELECT extract(epoch FROM started - created_at) AS latency FROM worker_jobs"
            f" WHERE id = {job['id']} AND started IS NOT NULL",
            lambda rows: len(rows) == 1,
        )
        print(f"wake-up after recovery: {row['latency'] * 1000:.1f} ms")
        assert row["latency"] < 5  # far below the 30 s poll: NOTIFY woke it
        assert stop(a) == 0 and stop(b) == 0
    summary = outcome_summary(pg_db)
    assert summary == {
        "jobs": JOBS + 1, "succeeded": JOBS + 1, "unfinished": 0, "lost_runs": 0,
        "max_attempt": 1,
    }  # fmt: skip
    runs = read_runs(runs_file)
    assert overlapping(runs) == []
    assert set(runs_per_job(runs).values()) == {1}  # each job ran exactly once
    # One line when an outage starts and one when it ends, per process and restart.
    unreachable = log_lines(log, "database unreachable")
    back = log_lines(log, "database reachable again")
    assert 1 <= len(unreachable) <= 2 * 6, unreachable
    assert len(back) == len(unreachable)
    assert not log_lines(log, "Traceback")


async def _claim_after(url: str, lease: float, job_id: int) -> float:
    """Run a claimer (in this process) until it holds ``job_id``; return how long that took."""
    flow = Flow(concurrency=10)
    stopping = trio.Event()
    claimer = Claimer(
        url, DbOptions(2), flow, owner="rescuer", types=["chaos"], lease_seconds=lease,
        poll_seconds=0.1, stopping=stopping,
    )  # fmt: skip
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claimer.run)
        with trio.fail_after(lease * 5):
            while job_id not in flow.held:
                await flow.wake.wait_until(trio.current_time() + 0.05)
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    return took


async def test_no_expired_lease_is_rescued_for_a_lease_after_a_restart(
    pg: PostgresServer, pg_db: str
) -> None:
    """A run whose lease expired while the server was down may belong to a worker that lived
    through the outage: for one lease after the restart nobody rescues it."""
    lease = 2.0
    query(pg_db, "SELECT qdworker_server_epoch()")  # the server as qdworker first saw it
    [job] = query(
        pg_db,
        "INSERT INTO worker_jobs (type, started, claims, lease_owner, lease_expires_at)"
        " VALUES ('chaos', now(), 1, 'survivor', now() - interval '1 second') RETURNING id",
    )
    pg.restart("fast")
    took = await _claim_after(pg_db, lease, job["id"])
    assert took >= lease * 0.9, took  # not before the grace (a defect rescues it at once)
    [row] = query(pg_db, f"SELECT attempt, lost_runs FROM worker_jobs WHERE id = {job['id']}")
    assert row == {"attempt": 2, "lost_runs": 1}


async def test_nothing_is_claimed_for_a_lease_after_a_failover(
    pg: PostgresServer, pg_db: str
) -> None:
    """The new primary may lack the last claims (asynchronous replication): for one lease
    after a failover nothing is claimed, so the workers running them can find out and stop."""
    lease = 2.0
    dbname = conninfo_to_dict(pg_db)["dbname"]
    query(pg_db, "SELECT qdworker_server_epoch()")  # the old primary, as qdworker saw it
    with pg.create_standby() as standby:
        standby.start()
        [job] = query(pg_db, "INSERT INTO worker_jobs (type) VALUES ('chaos') RETURNING id")
        eventually(standby.url(dbname), f"SELECT 1 FROM worker_jobs WHERE id = {job['id']}",
                   lambda rows: len(rows) == 1)  # fmt: skip
        pg.stop("immediate")
        standby.promote()
        took = await _claim_after(standby.url(dbname), lease, job["id"])
    assert took >= lease * 0.9, took  # a plain pending job, yet not claimed before the pause
