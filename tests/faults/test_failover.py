"""Fault 5: failover. A primary with a streaming standby (asynchronous replication); the
primary stops, the standby is promoted, and supervisors on a multi-host URL carry on."""

from __future__ import annotations

from pathlib import Path

from chaos import FAULT_SETTINGS, eventually, finished, insert_chaos, log_lines, query
from procs import running, start_supervisor, stop
from psycopg.conninfo import conninfo_to_dict
from runs import overlapping, read_runs

from qdworker.testing import PostgresServer

LEASE_SECONDS = 3.0


def test_failover_to_a_promoted_standby(
    pg: PostgresServer, pg_db: str, runs_file: Path, tmp_path: Path
) -> None:
    dbname = conninfo_to_dict(pg_db)["dbname"]
    with pg.create_standby() as standby:
        standby.start()
        url = (
            f"postgresql://postgres@{pg.host}:{pg.port},{standby.host}:{standby.port}/{dbname}"
            "?target_session_attrs=read-write&connect_timeout=2"
        )
        insert_chaos(pg_db, 2000, seconds=0.05)
        eventually(  # the standby has the jobs
            standby.url(dbname),
            "SELECT count(*) AS n FROM worker_jobs WHERE type = 'chaos'",
            lambda rows: rows[0]["n"] == 2000,
        )
        log = tmp_path / "supervisors.log"
        settings = {
            **FAULT_SETTINGS,
            "QDWORKER_LEASE_SECONDS": str(LEASE_SECONDS),
            "QDTEST_RUNS_FILE": str(runs_file),
        }
        with (
            running(start_supervisor(url, log=log, **settings)) as a,
            running(start_supervisor(url, log=log, **settings)) as b,
        ):
            finished(pg_db, 300)
            pg.stop("immediate")  # the primary is gone, as in a crash
            standby.promote()
            new_primary = standby.url(dbname)
            finished(new_primary, 2000, timeout=120)
            [job] = query(
                new_primary, "INSERT INTO worker_jobs (type) VALUES ('chaos') RETURNING id"
            )
            eventually(
                new_primary,
                f"SELECT 1 FROM worker_jobs WHERE id = {job['id']} AND finished IS NOT NULL",
                lambda rows: len(rows) == 1,
            )
            assert stop(a) == 0 and stop(b) == 0
        [summary] = query(
            new_primary,
            "SELECT count(*) AS jobs, count(*) FILTER (WHERE success) AS succeeded"
            " FROM worker_jobs WHERE type = 'chaos'",
        )
    assert summary == {"jobs": 2001, "succeeded": 2001}
    # Jobs finished on the old primary but not replicated may run again, never at once.
    assert overlapping(read_runs(runs_file)) == []
    assert log_lines(log, "failed over")  # the workers noticed and paused claiming
