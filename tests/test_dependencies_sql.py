"""Dependencies kept by the database (sql/migrations/0013_dependencies.sql), from plain SQL:
the insert trigger's checks and counts, the finish trigger's count-off, cancel and release,
retry chains, and the claim skipping waiting jobs."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

INSERT = "INSERT INTO worker_jobs (type, data) VALUES ('noop', '{}') RETURNING id"


def _new(sql: psycopg.Connection[Any], n: int = 1) -> list[int]:
    return [sql.execute(INSERT).fetchone()["id"] for _ in range(n)]


def _child(sql: psycopg.Connection[Any], parents: list[int], on_failure: str = "cancel") -> int:
    row = sql.execute(
        "INSERT INTO worker_jobs (type, data, depends_on, on_parent_failure) "
        "VALUES ('merge', '{}', %s, %s) RETURNING id",
        (parents, on_failure),
    ).fetchone()
    return int(row["id"])


def _finish(sql: psycopg.Connection[Any], job_id: int, success: bool = True) -> None:
    sql.execute(
        "UPDATE worker_jobs SET started = now(), finished = now(), success = %s, "
        "result = jsonb_build_object('from', id) WHERE id = %s",
        (success, job_id),
    )


def _row(sql: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    row = sql.execute(
        "SELECT *, due <= now() AS is_due FROM worker_jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert row is not None
    return dict(row)


def test_a_child_waits_for_every_parent_and_is_due_after_the_last(sql: Any) -> None:
    parents = _new(sql, 3)
    child = _child(sql, parents)
    row = _row(sql, child)
    assert (row["waiting_on"], row["is_due"], row["depends_on"]) == (3, False, parents)
    assert all(_row(sql, p)["has_dependents"] for p in parents)
    _finish(sql, parents[0])
    _finish(sql, parents[2])
    assert (_row(sql, child)["waiting_on"], _row(sql, child)["is_due"]) == (1, False)
    _finish(sql, parents[1])
    row = _row(sql, child)
    assert (row["waiting_on"], row["is_due"], row["finished"]) == (0, True, None)


def test_a_missing_parent_is_an_error_naming_it(sql: Any) -> None:
    [parent] = _new(sql)
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match=f"job {parent + 1000}"):
        _child(sql, [parent, parent + 1000])
    with pytest.raises(psycopg.errors.NotNullViolation):
        sql.execute(
            "INSERT INTO worker_jobs (type, depends_on) VALUES ('merge', ARRAY[%s, NULL])",
            (parent,),
        )


def test_finished_parents_count_at_insert(sql: Any) -> None:
    done, failed, open_ = _new(sql, 3)
    _finish(sql, done)
    _finish(sql, failed, success=False)
    assert _row(sql, _child(sql, [done]))["is_due"]
    cancelled = _row(sql, _child(sql, [done, open_, failed]))
    assert cancelled["finished"] is not None and cancelled["success"] is False
    assert cancelled["result"]["failed_parent"] == failed
    runs = _row(sql, _child(sql, [done, open_, failed], on_failure="run"))
    assert (runs["waiting_on"], runs["finished"]) == (1, None)


def test_a_parent_that_fails_for_good_cancels_or_releases(sql: Any) -> None:
    bad, good = _new(sql, 2)
    cancelled = _child(sql, [good, bad])
    grandchild = _child(sql, [cancelled])
    runs = _child(sql, [good, bad], on_failure="run")
    _finish(sql, bad, success=False)
    row = _row(sql, cancelled)
    assert (row["success"], row["result"]["failed_parent"]) == (False, bad)
    assert f"Parent job {bad} failed" in row["result"]["error"]
    assert _row(sql, grandchild)["result"]["failed_parent"] == cancelled  # cascades
    assert (_row(sql, runs)["waiting_on"], _row(sql, runs)["is_due"]) == (1, False)
    _finish(sql, good)
    assert _row(sql, runs)["is_due"]


def test_a_retried_parent_carries_its_dependents_to_the_retry(sql: Any) -> None:
    [parent] = _new(sql)
    child = _child(sql, [parent])
    # What the finish statement does in one statement: fail the row, insert its retry
    # (copying has_dependents, as worker.sql's successor does).
    retry = sql.execute(
        "WITH done AS (UPDATE worker_jobs SET started = now(), finished = now(), "
        "success = false WHERE id = %(p)s RETURNING *) "
        "INSERT INTO worker_jobs (type, data, rescheduled_from_job, has_dependents) "
        "SELECT type, data, id, has_dependents FROM done RETURNING id",
        {"p": parent},
    ).fetchone()["id"]
    assert _row(sql, child)["waiting_on"] == 1 and _row(sql, child)["finished"] is None
    assert _row(sql, retry)["has_dependents"]
    _finish(sql, retry)
    assert _row(sql, child)["is_due"]
    parents = sql.execute("SELECT * FROM qdworker_parent_results(%s)", (child,)).fetchall()
    assert [(r["parent"], r["final_id"], r["result"]) for r in parents] == [
        (parent, retry, {"from": retry})
    ]


def test_a_child_named_after_the_retry_follows_the_chain(sql: Any) -> None:
    [parent] = _new(sql)
    _finish(sql, parent, success=False)
    [retry] = [
        sql.execute(
            "INSERT INTO worker_jobs (type, rescheduled_from_job) VALUES ('noop', %s) RETURNING id",
            (parent,),
        ).fetchone()["id"]
    ]
    child = _child(sql, [parent, retry])  # one chain: counted once
    assert _row(sql, child)["waiting_on"] == 1
    _finish(sql, retry)
    assert _row(sql, child)["is_due"]


def test_the_claim_stops_before_waiting_jobs(sql: Any) -> None:
    [parent] = _new(sql)
    child = _child(sql, [parent])
    plan = "\n".join(
        r["QUERY PLAN"]
        for r in sql.execute(
            "EXPLAIN SELECT id FROM worker_jobs AS j WHERE j.queue = 'default' "
            "AND j.started IS NULL AND j.finished IS NULL "
            "AND qdworker_run_order(j.due, j.priority) < '9000-01-01'::timestamp "
            "ORDER BY qdworker_run_order(j.due, j.priority), j.id LIMIT 10"
        ).fetchall()
    )
    assert "worker_jobs_queue_pending_idx" in plan and "Index Cond" in plan
    assert "9000-01-01" in plan.split("Index Cond")[1]
    assert _row(sql, child)["due"].year == 9999


def test_the_limited_queue_claim_skips_waiting_jobs(sql: Any) -> None:
    [parent] = [
        sql.execute(
            "INSERT INTO worker_jobs (type, queue) VALUES ('noop', 'q') RETURNING id"
        ).fetchone()["id"]
    ]
    child = sql.execute(
        "INSERT INTO worker_jobs (type, queue, depends_on) VALUES ('noop', 'q', %s) RETURNING id",
        ([parent],),
    ).fetchone()["id"]
    claimed = sql.execute(
        "SELECT id FROM qdworker_claim_in_order('q', 'w', ARRAY['noop'], 10, 30, now())"
    ).fetchall()
    assert [r["id"] for r in claimed] == [parent]
    sql.execute("INSERT INTO worker_queues (name, key_concurrency) VALUES ('q', 1)")
    queue = "(SELECT w FROM worker_queues AS w WHERE name = 'q')"
    by_key = f"SELECT id FROM qdworker_claim_by_key({queue}, 'w', ARRAY['noop'], 10, 30, now())"
    assert sql.execute(by_key).fetchall() == []  # the parent is running; the child waits
    _finish(sql, parent)
    assert [r["id"] for r in sql.execute(by_key).fetchall()] == [child]


def test_plain_sql_cannot_set_the_bookkeeping_columns(sql: Any) -> None:
    row = sql.execute(
        "INSERT INTO worker_jobs (type, waiting_on, has_dependents) VALUES ('noop', 3, true) "
        "RETURNING waiting_on, has_dependents, due <= now() AS is_due"
    ).fetchone()
    assert row == {"waiting_on": 0, "has_dependents": False, "is_due": True}
