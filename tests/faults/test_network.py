"""Fault 4: the network between one supervisor (and its workers) and Postgres black-holes
packets (a proxy that stops forwarding without closing anything), for three leases."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from chaos import FAULT_SETTINGS, eventually, finished, insert_chaos, log_lines, outcome_summary
from procs import running, start_supervisor, stop
from runs import overlapping, read_runs

from qdworker.testing import PostgresServer, TcpProxy, worker_pids

LEASE_SECONDS = 3.0
DB_TIMEOUT_SECONDS = 2.0


def _log_time(line: str) -> float:
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()


def test_black_hole_between_a_worker_and_postgres(
    pg: PostgresServer, pg_db: str, runs_file: Path, tmp_path: Path
) -> None:
    insert_chaos(pg_db, 20, seconds=5.0)  # still running when the hole opens: stopped
    insert_chaos(pg_db, 60, seconds=1.0)  # done, unwritten: discarded once rescued
    settings = {
        **FAULT_SETTINGS,
        "WORKER_COUNT": "1",
        "QDWORKER_LEASE_SECONDS": str(LEASE_SECONDS),
        "QDWORKER_DB_TIMEOUT": str(DB_TIMEOUT_SECONDS),
        "QDTEST_RUNS_FILE": str(runs_file),
    }
    cut_off, direct = tmp_path / "cut-off.log", tmp_path / "direct.log"
    proxy = TcpProxy(pg.host, pg.port).start()
    with (
        proxy,
        running(start_supervisor(proxy.url(pg_db), log=cut_off, **settings)) as a,
        running(start_supervisor(pg_db, log=direct, **settings)) as b,
    ):
        eventually(
            pg_db,
            "SELECT count(DISTINCT lease_owner) AS n FROM worker_jobs"
            " WHERE started IS NOT NULL AND finished IS NULL AND (data->>'seconds')::float > 2",
            lambda rows: rows[0]["n"] == 2,  # both workers are running long jobs
        )
        [a_worker] = worker_pids(a.pid)
        proxy.blackhole()
        hole = time.time()
        time.sleep(3 * LEASE_SECONDS)  # the black hole itself, not synchronisation
        proxy.restore()
        finished(pg_db, 80, timeout=90)
        assert worker_pids(a.pid) == [a_worker]  # the cut-off worker did not exit
        assert stop(a) == 0 and stop(b) == 0
    summary = outcome_summary(pg_db)
    assert (summary["jobs"], summary["succeeded"], summary["unfinished"]) == (80, 80, 0)
    runs = read_runs(runs_file)
    assert overlapping(runs) == []  # the cut-off worker stopped before anyone rescued its jobs
    # It noticed: it stopped its runs before their leases ran out, and declared the outage
    # within the documented detection time (a statement's deadline, QDWORKER_DB_TIMEOUT + 2 s,
    # then one failed reconnect, connect_timeout = QDWORKER_DB_TIMEOUT): margin for the renewal
    # period and a busy machine.
    stopped = log_lines(cut_off, "lease could not be renewed")
    assert stopped, "the cut-off worker must stop its runs"
    assert all(_log_time(line) - hole < LEASE_SECONDS for line in stopped)
    unreachable = log_lines(cut_off, "database unreachable")
    assert unreachable
    detected = min(_log_time(line) for line in unreachable) - hole
    print(f"black hole noticed after {detected:.1f} s")
    assert detected < (DB_TIMEOUT_SECONDS + 2) + DB_TIMEOUT_SECONDS + LEASE_SECONDS
    assert log_lines(cut_off, "database reachable again")
