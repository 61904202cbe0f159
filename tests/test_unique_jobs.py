"""Unique jobs: ``on_tag_conflict='keep'`` keeps the pending or running job of a tag instead of
inserting another, race-free; successors are never skipped."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg

from qdworker import job
from qdworker.testing import InlineWorker

RACERS = 8
ROUNDS = 5


@job("keepThenFail")
async def keep_then_fail(ctx: Any) -> None:
    """While running, a replace-mode job of the same tag arrives; then the run fails."""
    await ctx.db.execute("INSERT INTO worker_jobs (type, tag) VALUES ('later', %s)", (ctx.job.tag,))
    raise RuntimeError("failed on purpose")


def _unfinished(sql: psycopg.Connection, tag: str) -> list[int]:
    rows = sql.execute(
        "SELECT id FROM worker_jobs WHERE tag = %s AND finished IS NULL ORDER BY id", (tag,)
    ).fetchall()
    return [row["id"] for row in rows]


def _start(sql: psycopg.Connection, job_id: int) -> None:
    """Mark a job claimed, as a worker's claim would."""
    sql.execute(
        "UPDATE worker_jobs SET started = now(), claims = claims + 1, lease_owner = 'w', "
        "lease_expires_at = now() + interval '1 minute' WHERE id = %s",
        (job_id,),
    )


def test_plain_sql_keep_returns_no_row(sql: Any) -> None:
    insert = (
        "INSERT INTO worker_jobs (type, tag, on_tag_conflict) "
        "VALUES ('sync', 'sync:42', 'keep') RETURNING id"
    )
    [first] = sql.execute(insert).fetchall()
    assert sql.execute(insert).fetchall() == []
    _start(sql, first["id"])
    assert sql.execute(insert).fetchall() == []
    assert _unfinished(sql, "sync:42") == [first["id"]]


def _race(db_url: str, insert: Callable[[psycopg.Connection], Any]) -> list[list[Any]]:
    """ROUNDS rounds of RACERS connections calling ``insert`` at once (a barrier), each round
    checked to leave one unfinished 'race' job, then that job finished. Returns each round's
    results."""
    conns = [psycopg.connect(db_url, autocommit=True) for _ in range(RACERS)]
    rounds: list[list[Any]] = []
    try:
        with psycopg.connect(db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as sql:
            for _ in range(ROUNDS):
                rounds.append(_one_round(conns, insert))
                assert len(_unfinished(sql, "race")) == 1, rounds[-1]
                sql.execute("UPDATE worker_jobs SET finished = now(), success = true")
    finally:
        for conn in conns:
            conn.close()
    return rounds


def _one_round(conns: list[psycopg.Connection], insert: Callable[..., Any]) -> list[Any]:
    barrier = threading.Barrier(len(conns))
    results: list[Any] = [None] * len(conns)
    errors: list[BaseException] = []

    def racer(k: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[k] = insert(conns[k])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(k,)) for k in range(len(conns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


def test_keep_race_through_plain_sql_leaves_one_job(db_url: str) -> None:
    def insert(conn: psycopg.Connection) -> int:
        return len(
            conn.execute(
                "INSERT INTO worker_jobs (type, tag, on_tag_conflict) "
                "VALUES ('sync', 'race', 'keep') RETURNING id"
            ).fetchall()
        )

    for inserted in _race(db_url, insert):
        assert sorted(inserted) == [0] * (RACERS - 1) + [1]


async def test_a_retry_of_a_keep_mode_job_is_never_skipped(
    sql: Any, qdworker_inline: InlineWorker
) -> None:
    [first] = sql.execute(
        "INSERT INTO worker_jobs (type, tag, on_tag_conflict, auto_reschedule_on_failure) "
        "VALUES ('keepThenFail', 't', 'keep', true) RETURNING id"
    ).fetchall()
    [run] = await qdworker_inline.run_due()
    assert run.job.id == first["id"] and not run.succeeded
    retry = sql.execute(
        "SELECT id, attempt, on_tag_conflict FROM worker_jobs WHERE rescheduled_from_job = %s",
        (first["id"],),
    ).fetchone()
    # The run's own job arrived while it ran, unfinished: keep mode would have skipped the
    # retry; successors go through QuickDapp's rule instead, which replaces that job.
    assert retry is not None and (retry["attempt"], retry["on_tag_conflict"]) == (2, "keep")
    assert _unfinished(sql, "t") == [retry["id"]]
