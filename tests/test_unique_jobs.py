"""Unique jobs: ``on_tag_conflict='keep'`` keeps the pending or running job of a tag instead of
inserting another, from Python and from plain SQL, race-free; successors are never skipped."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import trio

from qdworker import Job, Queue, job
from qdworker._db import statements, store
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


async def test_keep_leaves_the_pending_job_and_returns_it(db_url: str, sql: Any) -> None:
    async with Queue(db_url) as queue:
        first = await queue.submit_job(type="sync", tag="sync:42", data={"n": 1})
        kept = await queue.submit_job(
            type="sync", tag="sync:42", data={"n": 2}, on_tag_conflict="keep"
        )
        assert kept == await queue.get_job(first.id)
    assert kept.status == "pending" and kept.data == {"n": 1}
    assert _unfinished(sql, "sync:42") == [first.id]
    assert sql.execute("SELECT count(*) AS n FROM worker_jobs").fetchone() == {"n": 1}


async def test_keep_skips_while_the_job_runs(db_url: str, sql: Any) -> None:
    async with Queue(db_url) as queue:
        first = await queue.submit_job(type="sync", tag="sync:42", on_tag_conflict="keep")
        _start(sql, first.id)
        kept = await queue.submit_job(type="sync", tag="sync:42", on_tag_conflict="keep")
    assert (kept.id, kept.status) == (first.id, "running")
    assert _unfinished(sql, "sync:42") == [first.id]


async def test_keep_inserts_when_the_tag_has_no_unfinished_job(db_url: str, sql: Any) -> None:
    async with Queue(db_url) as queue:
        first = await queue.submit_job(type="sync", tag="sync:42", on_tag_conflict="keep")
        assert first.on_tag_conflict == "keep" and first.status == "pending"
        sql.execute("UPDATE worker_jobs SET finished = now(), success = true")
        second = await queue.submit_job(type="sync", tag="sync:42", on_tag_conflict="keep")
    assert second.id != first.id
    assert _unfinished(sql, "sync:42") == [second.id]


async def test_replace_still_cancels_a_pending_keep_mode_job(db_url: str, sql: Any) -> None:
    async with Queue(db_url) as queue:
        kept = await queue.submit_job(type="sync", tag="sync:42", on_tag_conflict="keep")
        new = await queue.submit_job(type="sync", tag="sync:42")
        old = await queue.get_job(kept.id)
    assert new.on_tag_conflict == "replace"
    assert old is not None and old.status == "failed"
    assert _unfinished(sql, "sync:42") == [new.id]


async def test_submit_jobs_returns_the_inserted_or_kept_job_of_each_entry(
    db_url: str, sql: Any
) -> None:
    async with Queue(db_url) as queue:
        existing = await queue.submit_job(type="sync", tag="a")
        jobs = await queue.submit_jobs([
            {"type": "sync", "tag": "a", "on_tag_conflict": "keep"},  # kept: existing
            {"type": "sync", "tag": "b", "on_tag_conflict": "keep", "data": {"i": 1}},
            {"type": "plain", "data": {"i": 2}},
            {"type": "sync", "tag": "b", "on_tag_conflict": "keep", "data": {"i": 3}},
            {"type": "sync", "on_tag_conflict": "keep", "data": {"i": 4}},  # no tag: inserted
        ])  # fmt: skip
    assert jobs[0] == existing
    assert [j.data.get("i") for j in jobs[1:]] == [1, 2, 1, 4]
    assert jobs[3] == jobs[1]
    assert len({j.id for j in jobs}) == 4
    assert _unfinished(sql, "a") == [existing.id]
    assert _unfinished(sql, "b") == [jobs[1].id]
    assert sql.execute("SELECT count(*) AS n FROM worker_jobs").fetchone() == {"n": 4}


async def test_keep_in_the_callers_transaction(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        async with Queue(db_url) as queue:
            first = await queue.submit_job(
                type="sync", tag="t", on_tag_conflict="keep", connection=conn
            )
            again = await queue.submit_job(
                type="sync", tag="t", on_tag_conflict="keep", connection=conn
            )
            assert again == first
            conn.rollback()
            assert await queue.get_job(first.id) is None


def test_keep_on_an_asyncio_connection(db_url: str) -> None:
    async def main() -> list[Job]:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
        async with conn, Queue(db_url) as queue:
            first = await queue.submit_job(
                type="sync", tag="t", on_tag_conflict="keep", connection=conn
            )
            many = await queue.submit_jobs(
                [{"type": "sync", "tag": "t", "on_tag_conflict": "keep"}] * 2, connection=conn
            )
            return [first, *many]

    jobs = asyncio.run(main())
    assert [j.id for j in jobs] == [jobs[0].id] * 3


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


def test_keep_race_through_the_api_leaves_one_job(db_url: str) -> None:
    queue = Queue(db_url)

    def submit(conn: psycopg.Connection) -> int:
        async def main() -> int:
            job = await queue.submit_job(
                type="sync", tag="race", on_tag_conflict="keep", connection=conn
            )
            return job.id

        return trio.run(main)

    for ids in _race(db_url, submit):
        assert len(set(ids)) == 1  # everyone got the one job


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


async def test_keep_race_between_queues_leaves_one_job(db_url: str, sql: Any) -> None:
    """The same race through Queues' own connections (trio tasks)."""
    queues = [await Queue(db_url).open() for _ in range(RACERS)]
    go = trio.Event()
    ids: list[int] = []

    async def submit(queue: Queue) -> None:
        await go.wait()
        job = await queue.submit_job(type="sync", tag="race", on_tag_conflict="keep")
        ids.append(job.id)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for queue in queues:
                    nursery.start_soon(submit, queue)
                await trio.sleep(0.05)
                go.set()
    finally:
        for queue in queues:
            await queue.aclose()
    assert len(ids) == RACERS and len(set(ids)) == 1
    assert _unfinished(sql, "race") == ids[:1]


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


def test_kept_job_gone_before_it_is_read_back_means_a_second_round(db_url: str) -> None:
    """The kept job finishes between the skipped insert and the read-back: nothing of the tag
    is unfinished, so the entry is inserted after all (the statements run by hand, in one
    transaction, as Queue runs them)."""
    with (
        psycopg.connect(db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as sql,
        psycopg.connect(db_url) as conn,
    ):
        [kept] = sql.execute(
            "INSERT INTO worker_jobs (type, tag) VALUES ('sync', 't') RETURNING id"
        ).fetchall()
        steps = store.keep_rounds([{"type": "sync", "tag": "t", "on_tag_conflict": "keep"}])
        names = []

        def answer(name: str, params: Any) -> list[Any]:
            names.append(name)
            with conn.cursor(row_factory=store.maybe_job_row, binary=True) as cur:
                return cur.execute(statements.get(name), params).fetchall()

        name, params = next(steps)
        rows = answer(name, params)
        assert rows == [None]
        sql.execute("UPDATE worker_jobs SET finished = now(), success = true")
        try:
            while True:
                name, params = steps.send(rows)
                rows = answer(name, params)
        except StopIteration as done:
            [new] = done.value
        conn.commit()
    assert names == ["insert_jobs_per_entry", "tag_holders", "insert_jobs_per_entry"]
    assert new.id != kept["id"] and new.status == "pending"
