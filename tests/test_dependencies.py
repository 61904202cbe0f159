"""Dependencies with real workers and supervisors: fan-in of 1,000 parents across two
supervisors (the child runs once, after the last parent, and reads every result), a parent
that fails and succeeds on retry, parents that fail for good (children cancelled, or run with
on_parent_failure='run'), batches with ``then``, and the client's field checks."""

from __future__ import annotations

import random
from typing import Any

import psycopg
import pytest
from procs import all_finished, running, start_worker, wait_for
from psycopg.rows import dict_row
from spans import two_supervisors

from qdworker import Batch, DatabaseError, InvalidJobError, Queue

FAN_IN = 1_000
WORKERS = "SELECT count(*) AS n FROM qdworker_workers WHERE stopped_at IS NULL"


def _sql(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def runs_db(db_url: str) -> str:
    _sql(
        db_url,
        "CREATE TABLE test_runs (job_id bigint, worker_id text, "
        "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    return db_url


def _job(db_url: str, job_id: int) -> dict[str, Any]:
    [row] = _sql(db_url, "SELECT * FROM worker_jobs WHERE id = %s", (job_id,))
    return row


def _finished(db_url: str, job_id: int, timeout: float) -> dict[str, Any]:
    query = "SELECT * FROM worker_jobs WHERE id = %s"
    [row] = wait_for(db_url, query, all_finished, timeout=timeout, params=(job_id,))
    return row


async def test_fan_in_of_1000_parents_across_two_supervisors(runs_db: str) -> None:
    with two_supervisors(runs_db, QDWORKER_CONCURRENCY="8"):
        # Every worker of both supervisors ready before the work arrives, so both take part.
        wait_for(runs_db, WORKERS, lambda rows: rows[0]["n"] == 4, timeout=60)
        async with Queue(runs_db) as queue:
            batch = await queue.submit_jobs(
                [{"type": "tally", "data": {"v": i}} for i in range(FAN_IN)],
                then={"type": "merge", "data": {"fan": "in"}},
            )
        assert isinstance(batch, Batch) and len(batch.jobs) == FAN_IN
        child = _finished(runs_db, batch.then.id, timeout=120)
    parent_ids = [job.id for job in batch.jobs]
    assert batch.then.depends_on == parent_ids and batch.then.waiting_on == FAN_IN
    assert child["success"] is True, child["result"]
    assert child["result"]["n"] == FAN_IN
    assert child["result"]["values"] == list(range(FAN_IN))  # every parent's result
    runs = _sql(runs_db, "SELECT * FROM test_runs WHERE job_id = %s", (batch.then.id,))
    assert len(runs) == 1  # ran exactly once
    [last] = _sql(
        runs_db,
        "SELECT max(finished) AS at, bool_and(success) AS ok FROM worker_jobs WHERE id = ANY(%s)",
        (parent_ids,),
    )
    assert last["ok"] is True
    assert child["started"] >= last["at"]  # after the last parent finished
    # The parents were finished by both supervisors (worker ids are host:pid:...).
    [spread] = _sql(
        runs_db,
        "SELECT count(DISTINCT split_part(worker_id, ':', 2)) AS n FROM test_runs "
        "WHERE job_id = ANY(%s)",
        (parent_ids,),
    )
    print(f"\nfan-in {FAN_IN}: child ran once, {child['started'] - last['at']} after the last")
    assert spread["n"] == 2


def test_a_parent_that_fails_then_succeeds_on_retry_releases_its_child(runs_db: str) -> None:
    [flaky] = _sql(
        runs_db,
        "INSERT INTO worker_jobs (type, data, max_attempts, auto_reschedule_on_failure) "
        "VALUES ('flaky', '{\"v\": 7}', 3, true) RETURNING id",
    )
    [steady] = _sql(
        runs_db, "INSERT INTO worker_jobs (type, data) VALUES ('echo', '{\"v\": 1}') RETURNING id"
    )
    [child] = _sql(
        runs_db,
        "INSERT INTO worker_jobs (type, depends_on) VALUES ('merge', %s) RETURNING id",
        ([flaky["id"], steady["id"]],),
    )
    with running(start_worker(runs_db)):
        row = _finished(runs_db, child["id"], timeout=30)
    assert row["success"] is True, row["result"]
    [retry] = _sql(
        runs_db, "SELECT * FROM worker_jobs WHERE rescheduled_from_job = %s", (flaky["id"],)
    )
    assert _job(runs_db, flaky["id"])["success"] is False and retry["success"] is True
    parents = row["result"]["parents"]
    assert parents == {str(flaky["id"]): {"v": 7, "attempt": 2}, str(steady["id"]): {"v": 1}}
    assert row["started"] >= retry["finished"]


def test_a_parent_that_fails_for_good_cancels_children_unless_they_run(runs_db: str) -> None:
    [bad] = _sql(runs_db, "INSERT INTO worker_jobs (type, data) VALUES ('boom', '{}') RETURNING id")
    ids = {}
    for mode in ("cancel", "run"):
        [row] = _sql(
            runs_db,
            "INSERT INTO worker_jobs (type, depends_on, on_parent_failure) "
            "VALUES ('merge', %s, %s) RETURNING id",
            ([bad["id"]], mode),
        )
        ids[mode] = row["id"]
    with running(start_worker(runs_db)):
        ran = _finished(runs_db, ids["run"], timeout=30)
        cancelled = _finished(runs_db, ids["cancel"], timeout=30)
    assert _job(runs_db, bad["id"])["dead_at"] is not None
    assert cancelled["success"] is False and cancelled["started"] is None
    assert cancelled["result"]["failed_parent"] == bad["id"]
    assert f"Parent job {bad['id']} failed" in cancelled["result"]["error"]
    assert ran["success"] is True
    assert ran["result"]["parents"][str(bad["id"])]["error_type"] == "ValueError"
    runs = _sql(runs_db, "SELECT job_id FROM test_runs")
    assert runs == [{"job_id": ids["run"]}]


async def test_submit_job_with_depends_on_and_the_checks(db_url: str) -> None:
    async with Queue(db_url) as queue:
        parent = await queue.submit_job(type="noop")
        child = await queue.submit_job(
            type="merge", depends_on=[parent.id], on_parent_failure="run"
        )
        assert (child.depends_on, child.on_parent_failure, child.waiting_on) == (
            [parent.id],
            "run",
            1,
        )
        assert (await queue.get_job(parent.id)).has_dependents  # type: ignore[union-attr]
        plain = await queue.submit_job(type="noop", depends_on=[])
        assert (plain.depends_on, plain.waiting_on) == (None, 0)
        for bad in ({"depends_on": "1,2"}, {"depends_on": [1, "2"]}, {"depends_on": [0]}):
            with pytest.raises(InvalidJobError, match="depends_on"):
                await queue.submit_job(type="merge", **bad)
        with pytest.raises(InvalidJobError, match="on_parent_failure"):
            await queue.submit_job(type="merge", depends_on=[parent.id], on_parent_failure="x")
        with pytest.raises(DatabaseError, match=f"job {parent.id + 10_000}") as missing:
            await queue.submit_job(type="merge", depends_on=[parent.id + 10_000])
        assert missing.value.sqlstate == "23503"  # foreign_key_violation
        with pytest.raises(InvalidJobError, match="at least one job"):
            await queue.submit_jobs([], then={"type": "merge"})
        with pytest.raises(InvalidJobError, match="keep"):
            await queue.submit_jobs(
                [{"type": "noop", "tag": "t", "on_tag_conflict": "keep"}], then={"type": "m"}
            )
        with pytest.raises(InvalidJobError, match="type"):
            await queue.submit_jobs([{"type": "noop"}], then={"data": {}})


async def test_a_batch_with_then_in_the_callers_transaction(db_url: str) -> None:
    async with Queue(db_url) as queue:
        with psycopg.connect(db_url) as conn:
            batch = await queue.submit_jobs(
                [{"type": "noop"}, {"type": "noop"}],
                then={"type": "merge", "depends_on": [], "on_parent_failure": "run"},
                connection=conn,
            )
            conn.rollback()
        assert await queue.get_job(batch.then.id) is None  # the caller's transaction
        batch = await queue.submit_jobs(
            [{"type": "noop"}, {"type": "noop"}], then={"type": "merge", "on_parent_failure": "run"}
        )
    assert batch.then.depends_on == [j.id for j in batch.jobs]
    assert (batch.then.waiting_on, batch.then.on_parent_failure) == (2, "run")
    assert batch.then.id > max(j.id for j in batch.jobs)


def test_overlapping_fan_ins_across_two_supervisors_run_each_child_once(runs_db: str) -> None:
    """Children sharing parents, whose parents finish in batches on four workers: the
    count-offs of different children in one batch must neither deadlock nor be lost."""
    rng = random.Random(15)
    parents = [
        r["id"]
        for r in _sql(
            runs_db,
            "INSERT INTO worker_jobs (type, data) "
            "SELECT 'tally', jsonb_build_object('v', i) FROM generate_series(1, 300) AS i "
            "RETURNING id",
        )
    ]
    children = {}
    for _ in range(60):
        named = sorted(rng.sample(parents, 25))
        [row] = _sql(
            runs_db,
            "INSERT INTO worker_jobs (type, depends_on) VALUES ('merge', %s) RETURNING id",
            (named,),
        )
        children[row["id"]] = named
    unfinished = "SELECT count(*) AS n FROM worker_jobs WHERE finished IS NULL AND type = 'merge'"
    with two_supervisors(runs_db, QDWORKER_CONCURRENCY="8"):
        wait_for(runs_db, unfinished, lambda rows: rows[0]["n"] == 0, timeout=120)
    runs = _sql(
        runs_db,
        "SELECT job_id, count(*) AS n FROM test_runs WHERE job_id = ANY(%s) GROUP BY job_id",
        (list(children),),
    )
    assert {r["job_id"]: r["n"] for r in runs} == dict.fromkeys(children, 1)
    for child_id, named in children.items():
        child = _job(runs_db, child_id)
        assert child["success"] is True and child["result"]["n"] == len(named)
        [last] = _sql(
            runs_db, "SELECT max(finished) AS at FROM worker_jobs WHERE id = ANY(%s)", (named,)
        )
        assert child["started"] >= last["at"]
