"""Exactly-once database effects: ``ctx.transaction()`` commits a handler's writes together
with the job's completion, fenced by the run's claim; ``qdworker_run_is_current``."""

from __future__ import annotations

import signal
from typing import Any

import psycopg
import pytest
from procs import running, start_worker, stop, wait_for
from psycopg.rows import dict_row

JOBS = "qdtest_jobs,qdtx_jobs"


@pytest.fixture
def ledger_db(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (job_id bigint NOT NULL, claims integer NOT NULL)")
    return db_url


def sql(url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def insert(url: str, data: str, **columns: str) -> int:
    names = ", ".join(["type", "data", *columns])
    values = ", ".join(["'ledger'", f"'{data}'", *columns.values()])
    [row] = sql(url, f"INSERT INTO worker_jobs ({names}) VALUES ({values}) RETURNING id")
    return int(row["id"])


def test_writes_and_completion_commit_together(ledger_db: str) -> None:
    job_id = insert(ledger_db, "{}")
    with running(start_worker(ledger_db, QDWORKER_JOBS=JOBS)) as worker:
        # finished by the transaction's commit; the returned value is stored right after
        [row] = wait_for(ledger_db, f"SELECT * FROM worker_jobs WHERE id = {job_id}",
                         lambda rows: rows[0]["result"] == {"returned": True})  # fmt: skip
        assert stop(worker) == 0
    assert row["success"] is True
    assert sql(ledger_db, "SELECT job_id, claims FROM ledger") == [{"job_id": job_id, "claims": 1}]
    # The run's figures come with the returned value, after the commit finished the row.
    assert row["run_outcome"] == "returned" and row["run_wall_ms"] >= 0
    assert row["run_cpu_ms"] is not None and row["run_peak_rss_bytes"] is not None


def test_worker_killed_after_the_commit_the_job_is_done_once(ledger_db: str) -> None:
    job_id = insert(ledger_db, '{"exit_after_commit": true}')
    settings = {"QDWORKER_JOBS": JOBS, "QDWORKER_LEASE_SECONDS": "1"}
    with running(start_worker(ledger_db, **settings)) as worker:
        assert worker.wait(timeout=20) == 9  # it died right after committing
    # A sentinel due in 2 s: by the time it is claimed the dead worker's lease (1 s) is long
    # expired, so the same claim would rescue the ledger job if it were not finished.
    sentinel = insert(ledger_db, "{}", due="now() + interval '2 seconds'")
    with running(start_worker(ledger_db, **settings)) as worker:
        wait_for(ledger_db, f"SELECT finished FROM worker_jobs WHERE id = {sentinel}",
                 lambda rows: rows[0]["finished"] is not None)  # fmt: skip
        assert stop(worker) == 0
    [row] = sql(ledger_db, f"SELECT * FROM worker_jobs WHERE id = {job_id}")
    assert (row["success"], row["result"], row["attempt"]) == (True, {"written": True}, 1)
    assert [r["job_id"] for r in sql(ledger_db, "SELECT job_id FROM ledger ORDER BY job_id")] == [
        job_id,
        sentinel,
    ]


def test_worker_killed_inside_the_transaction_writes_nothing_and_the_job_runs_again(
    ledger_db: str,
) -> None:
    job_id = insert(ledger_db, '{"sleep_in_tx": 60}')
    settings = {"QDWORKER_JOBS": JOBS, "QDWORKER_LEASE_SECONDS": "1"}
    with running(start_worker(ledger_db, **settings)) as worker:
        wait_for(ledger_db, "SELECT count(*) AS n FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'"
                 " AND application_name = 'qdworker-job'", lambda rows: rows[0]["n"] == 1)  # fmt: skip
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    sql(ledger_db, f"UPDATE worker_jobs SET data = '{{}}' WHERE id = {job_id}")
    with running(start_worker(ledger_db, **settings)) as worker:
        [row] = wait_for(ledger_db, f"SELECT * FROM worker_jobs WHERE id = {job_id}",
                         lambda rows: rows[0]["finished"] is not None)  # fmt: skip
        assert stop(worker) == 0
    assert (row["success"], row["attempt"], row["lost_runs"]) == (True, 2, 1)
    assert sql(ledger_db, "SELECT job_id, claims FROM ledger") == [{"job_id": job_id, "claims": 2}]


def test_a_run_that_lost_its_claim_commits_nothing(ledger_db: str) -> None:
    job_id = insert(ledger_db, '{"sleep_in_tx": 2}')
    with running(start_worker(ledger_db, QDWORKER_JOBS=JOBS)) as worker:
        wait_for(ledger_db, "SELECT count(*) AS n FROM ledger", lambda rows: True)
        wait_for(ledger_db, f"SELECT claims FROM worker_jobs WHERE id = {job_id} AND started IS NOT NULL",
                 lambda rows: len(rows) == 1)  # fmt: skip
        # Another worker rescues the job meanwhile (its claim count moves on).
        sql(
            ledger_db,
            f"UPDATE worker_jobs SET claims = claims + 1, lease_owner = 'other' WHERE id = {job_id}",
        )
        wait_for(ledger_db, "SELECT count(*) AS n FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'"
                 " AND application_name = 'qdworker-job'", lambda rows: rows[0]["n"] == 0)  # fmt: skip
        assert stop(worker) == 0
    assert sql(ledger_db, "SELECT * FROM ledger") == []  # rolled back
    [row] = sql(ledger_db, f"SELECT finished, claims FROM worker_jobs WHERE id = {job_id}")
    assert row == {"finished": None, "claims": 2}  # untouched: it belongs to the other run


def test_a_cron_job_committed_by_its_transaction_gets_one_next_tick(ledger_db: str) -> None:
    job_id = insert(ledger_db, "{}", cron_schedule="'0 0 1 1 *'")
    with running(start_worker(ledger_db, QDWORKER_JOBS=JOBS)) as worker:
        rows = wait_for(ledger_db, "SELECT * FROM worker_jobs WHERE type = 'ledger' ORDER BY id",
                        lambda rows: rows[0]["finished"] is not None and len(rows) == 2)  # fmt: skip
        assert stop(worker) == 0
    assert rows[1]["rescheduled_from_job"] == job_id and rows[1]["finished"] is None
    assert len(sql(ledger_db, "SELECT * FROM worker_jobs WHERE type = 'ledger'")) == 2


def test_run_is_current(sql: psycopg.Connection) -> None:
    [job] = sql.execute("INSERT INTO worker_jobs (type) VALUES ('x') RETURNING id").fetchall()
    sql.execute("UPDATE worker_jobs SET started = now(), claims = 1 WHERE id = %s", (job["id"],))
    current = "SELECT qdworker_run_is_current(%s, %s) AS ok"
    assert sql.execute(current, (job["id"], 1)).fetchone() == {"ok": True}
    assert sql.execute(current, (job["id"], 0)).fetchone() == {"ok": False}
    sql.execute("UPDATE worker_jobs SET finished = now() WHERE id = %s", (job["id"],))
    assert sql.execute(current, (job["id"], 1)).fetchone() == {"ok": False}
