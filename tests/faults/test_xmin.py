"""Fault 9: a long transaction pins the xmin horizon (for up to 60 s) during a drain: dead row
versions cannot be removed meanwhile, so every claim steps over more of them. The drain must
go on; how much slower it gets is printed (and reported in docs/reliability.md)."""

from __future__ import annotations

import time

from chaos import FAULT_SETTINGS, finished, query
from procs import running, start_supervisor, stop

from qdworker.testing import pin_xmin

JOBS = 200_000
PIN_SECONDS = 60


def _drain(url: str, jobs: int) -> float:
    [done] = query(url, "SELECT count(*) AS n FROM worker_jobs WHERE finished IS NOT NULL")
    query(url, f"INSERT INTO worker_jobs (type) SELECT 'chaos' FROM generate_series(1, {jobs})")
    started = time.monotonic()
    finished(url, done["n"] + jobs, timeout=PIN_SECONDS * 3)
    return time.monotonic() - started


def test_drain_goes_on_while_a_long_transaction_pins_xmin(pg_db: str, tmp_path: object) -> None:
    settings = {
        **FAULT_SETTINGS,
        "WORKER_COUNT": "1",
        "QDTEST_RUNS_FILE": "/dev/null",
        "QDWORKER_POLL_INTERVAL": "1",
    }
    with running(start_supervisor(pg_db, **settings)) as supervisor:
        _drain(pg_db, 5000)  # warm up
        query(pg_db, "VACUUM worker_jobs")
        free = _drain(pg_db, JOBS)
        query(pg_db, "VACUUM worker_jobs")
        with pin_xmin(pg_db):
            pinned = _drain(pg_db, JOBS)
        assert stop(supervisor) == 0
    [summary] = query(
        pg_db, "SELECT count(*) FILTER (WHERE success) AS ok, count(*) AS n FROM worker_jobs"
    )
    assert summary["ok"] == summary["n"] - 1  # every chaos job; the cleanup cron job waits
    print(
        f"drain of {JOBS} jobs: {JOBS / free:,.0f} jobs/s free, {JOBS / pinned:,.0f} jobs/s with"
        f" xmin pinned ({pinned / free:.2f}x the time)"
    )
