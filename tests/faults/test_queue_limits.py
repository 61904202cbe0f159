"""A queue's cluster-wide limit through workers SIGKILLed while they run its jobs: a killed
run holds its slot until its job is rescued (the supervisor ends the dead worker's leases at
once), so the limit is never exceeded, and every job still succeeds."""

from __future__ import annotations

import random
import time
from pathlib import Path

from chaos import FAULT_SETTINGS, query
from procs import running, start_supervisor, stop, wait_for
from spans import create_spans_table, max_overlap, spans

from qdworker.testing import kill_worker

LIMIT = 2


def test_queue_limit_holds_through_killed_workers(pg_db: str, tmp_path: Path) -> None:
    create_spans_table(pg_db)
    query(pg_db, f"INSERT INTO worker_queues (name, concurrency) VALUES ('limited', {LIMIT})")
    query(pg_db, "INSERT INTO worker_jobs (type, queue, data) "
                 "SELECT 'span', 'limited', '{\"seconds\": 0.3}' FROM generate_series(1, 60)")  # fmt: skip
    # One worker each: a kill nearly always hits a worker running one of the queue's jobs.
    settings = {**FAULT_SETTINGS, "QDWORKER_JOBS": "qdtest_jobs", "WORKER_COUNT": "1"}
    log = tmp_path / "supervisors.log"
    rng = random.Random(7)
    kills = 0
    with (
        running(start_supervisor(pg_db, log=log, **settings)) as a,
        running(start_supervisor(pg_db, log=log, **settings)) as b,
    ):
        deadline = time.monotonic() + 120
        while query(pg_db, "SELECT count(*) AS n FROM worker_jobs WHERE queue = 'limited' "
                           "AND finished IS NULL")[0]["n"] > 0:  # fmt: skip
            assert time.monotonic() < deadline, "the limited queue did not drain"
            kills += kill_worker(rng.choice((a, b)).pid, rng=rng) is not None
            time.sleep(1.5)  # the fault's cadence, not synchronisation
        wait_for(pg_db, "SELECT count(*) AS n FROM worker_jobs WHERE queue = 'limited' "
                 "AND success IS NOT TRUE", lambda rows: rows[0]["n"] == 0)  # fmt: skip
        assert stop(a) == 0 and stop(b) == 0
    runs = spans(pg_db)
    # A killed run has no end: its slot was held until its job's next run began.
    next_start = {}
    for run in sorted(runs, key=lambda r: r["started"], reverse=True):
        run["held_until"] = run["ended"] or next_start.get(run["job_id"])
        next_start[run["job_id"]] = run["started"]
    [lost] = query(pg_db, "SELECT sum(lost_runs) AS n FROM worker_jobs")
    overlap = max_overlap((r["started"], r["held_until"]) for r in runs)
    print(f"\n{kills} workers killed, {lost['n']} runs lost; at most {overlap} of the queue's "
          f"jobs held a slot at once (limit {LIMIT})")  # fmt: skip
    assert lost["n"] > 0  # the kills did hit running jobs of the queue
    assert all(r["held_until"] is not None for r in runs)
    assert overlap == LIMIT
