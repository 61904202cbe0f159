"""Several supervisors on one database: no job runs twice, each cron tick runs once, the
built-in cron jobs are seeded once, and a killed worker's job runs again."""

from __future__ import annotations

import signal
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import psutil
import psycopg
import trio
from procs import running, start_supervisor, stop, wait_for, wait_until

from qdworker import Config, serve


def _runs_table(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE test_runs (job_id bigint, worker_id text, "
            "at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )


def test_two_supervisors_run_every_job_exactly_once(db_url: str) -> None:
    _runs_table(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO worker_jobs (type) SELECT 'record' FROM generate_series(1, 5000)")
    settings = {"WORKER_COUNT": "4", "QDWORKER_CONCURRENCY": "4"}
    with (
        running(start_supervisor(db_url, **settings)) as a,
        running(start_supervisor(db_url, **settings)) as b,
    ):
        wait_for(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE type = 'record' AND finished IS NULL",
                 lambda rows: rows[0]["n"] == 0, timeout=120)  # fmt: skip
        assert stop(a) == 0 and stop(b) == 0
    with psycopg.connect(db_url) as conn:
        runs = conn.execute(
            "SELECT count(*), count(DISTINCT job_id), count(DISTINCT worker_id) FROM test_runs"
        ).fetchone()
        failed = conn.execute(
            "SELECT count(*) FROM worker_jobs WHERE type = 'record' AND success IS NOT TRUE"
        ).fetchone()
    assert runs is not None and runs[0] == runs[1] == 5000
    assert runs[2] >= 2  # the work really was shared
    assert failed == (0,)


def test_killed_worker_is_restarted_and_its_job_runs_again(db_url: str) -> None:
    _runs_table(db_url)
    with running(start_supervisor(db_url, QDWORKER_LEASE_SECONDS="60")) as supervisor:
        with psycopg.connect(db_url, autocommit=True) as conn:
            [job_id] = conn.execute(
                "INSERT INTO worker_jobs (type, data) VALUES ('sleep', '{\"seconds\": 0.5}') RETURNING id"
            ).fetchone() or [None]
        [first] = wait_for(db_url, "SELECT worker_id FROM test_runs", lambda rows: len(rows) == 1)
        [child] = wait_until(lambda: psutil.Process(supervisor.pid).children())
        child.send_signal(signal.SIGKILL)
        rows = wait_for(db_url, "SELECT * FROM worker_jobs WHERE id = %s AND finished IS NOT NULL",
                        lambda r: len(r) == 1, params=(job_id,))  # fmt: skip
        [replacement] = psutil.Process(supervisor.pid).children()
        assert replacement.pid != child.pid
        assert stop(supervisor) == 0
    assert rows[0]["success"] is True and rows[0]["attempt"] == 2 and rows[0]["lost_runs"] == 1
    with psycopg.connect(db_url) as conn:
        workers = [r[0] for r in conn.execute("SELECT worker_id FROM test_runs ORDER BY at")]
    assert len(workers) == 2 and workers[0] == first["worker_id"] != workers[1]


def test_three_supervisors_run_each_cron_tick_once(db_url: str) -> None:
    _runs_table(db_url)
    procs = [start_supervisor(db_url) for _ in range(3)]
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO worker_jobs (type, tag, cron_schedule) VALUES ('record', 'cron:every-second', '*/1 * * * * *')"
            )
        rows = wait_for(
            db_url,
            "SELECT * FROM worker_jobs WHERE tag = 'cron:every-second' AND finished IS NOT NULL ORDER BY due",
            lambda r: len(r) >= 12,
            timeout=40,
        )
    finally:
        for proc in procs:
            stop(proc)
    ticks = rows[1:11]  # ten consecutive ticks after the first (immediate) run
    assert [r["success"] for r in ticks] == [True] * 10
    for before, after in pairwise(ticks):
        assert after["due"] - before["due"] == timedelta(seconds=1)
    with psycopg.connect(db_url) as conn:
        per_job = conn.execute(
            "SELECT job_id, count(*) FROM test_runs GROUP BY job_id HAVING count(*) > 1"
        ).fetchall()
        dues = conn.execute(
            "SELECT due, count(*) FROM worker_jobs WHERE tag = 'cron:every-second' GROUP BY due HAVING count(*) > 1"
        ).fetchall()
        workers = conn.execute("SELECT count(DISTINCT worker_id) FROM test_runs").fetchone()
    assert per_job == [] and dues == []  # never two runs for one tick
    assert workers is not None and workers[0] >= 2  # the ticks moved between supervisors


async def test_five_supervisors_seed_builtin_cron_jobs_once(db_url: str, tmp_path: Path) -> None:
    config = Config(
        http_port=0, database_url=db_url, worker_count=0, ws_enabled=False, data_dir=tmp_path
    )
    managers = []
    async with trio.open_nursery() as nursery:

        async def one() -> None:
            managers.append(await nursery.start(serve, config))

        async with trio.open_nursery() as starting:
            for _ in range(5):
                starting.start_soon(one)
        assert len(managers) == 5
        for manager in managers:
            await manager.shutdown()
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT tag, cron_schedule, auto_reschedule_on_failure_delay FROM worker_jobs WHERE finished IS NULL"
        ).fetchall()
    assert rows == [("cron:removeOldWorkerJobs", "0 0 * * * *", 60000)]


def test_workers_of_a_killed_supervisor_release_their_jobs_and_exit(db_url: str) -> None:
    _runs_table(db_url)
    supervisor = start_supervisor(db_url, QDWORKER_LEASE_SECONDS="60")
    with running(supervisor):
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO worker_jobs (type, data) VALUES ('sleep', '{\"seconds\": 60}')"
            )
        wait_for(db_url, "SELECT * FROM test_runs", lambda rows: len(rows) == 1)
        [child] = psutil.Process(supervisor.pid).children()
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        child.wait(timeout=2)  # it noticed the closed IPC socket
    [row] = wait_for(db_url, "SELECT * FROM worker_jobs WHERE type = 'sleep'", lambda rows: True)
    assert row["started"] is None and row["finished"] is None and row["lease_owner"] is None
