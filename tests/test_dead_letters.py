"""Dead letters without workers: listing and redriving dead jobs through the API and the SQL
functions ``qdworker_retry_job`` / ``qdworker_retry_dead``, the watchdog's completion, and the
migration that marks the rows that died before it. Real Postgres; dead rows are written as the
completer leaves them (tests/worker/test_dead_marking.py makes them with real workers)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from waiting import wait_until

from qdworker import InvalidJobError, Queue
from qdworker._db import connection, migrate, statements

DEAD_ROW = """
INSERT INTO worker_jobs (type, queue, tag, started, finished, success, result, dead_at, claims)
VALUES (%(type)s, %(queue)s, %(tag)s, now() - %(ago)s, now() - %(ago)s, false, %(result)s,
        now() - %(ago)s, 1)
RETURNING id
"""


def dead(
    sql: psycopg.Connection,
    job_type: str = "boom",
    *,
    queue: str = "default",
    error_type: str = "ValueError",
    ago: timedelta = timedelta(0),
    tag: str | None = None,
) -> int:
    """A row as the completer leaves a final failure; returns its id."""
    result = json.dumps({"error": f"it broke ({error_type})", "error_type": error_type})
    params = {"type": job_type, "queue": queue, "tag": tag, "ago": ago, "result": result}
    row = sql.execute(DEAD_ROW, params).fetchone()
    assert row is not None
    return int(row["id"])


def ids(jobs: list[Any]) -> list[int]:
    return [job.id for job in jobs]


async def test_dead_jobs_are_listed_by_filter_the_latest_death_first(
    sql: psycopg.Connection, db_url: str
) -> None:
    hour = timedelta(hours=1)
    old = dead(sql, ago=3 * hour)
    emails = dead(sql, queue="emails", ago=hour)
    timeout = dead(sql, "other", error_type="JobTimeout", ago=timedelta(minutes=10))
    # Not dead: a failure that was retried, a success, a pending job.
    sql.execute(
        """INSERT INTO worker_jobs (type, finished, success, result) VALUES
        ('boom', now(), false, '{"error": "x", "error_type": "ValueError"}'),
        ('boom', now(), true, '{}'), ('boom', NULL, NULL, NULL)"""
    )
    now = datetime.now(UTC)
    async with Queue(db_url) as queue:
        everything = await queue.dead_jobs()
        assert ids(everything) == [timeout, emails, old]
        assert {job.status for job in everything} == {"dead"}
        assert all(job.dead_at is not None for job in everything)
        assert ids(await queue.dead_jobs(type="boom")) == [emails, old]
        assert ids(await queue.dead_jobs(queue="emails")) == [emails]
        assert ids(await queue.dead_jobs(error_type="JobTimeout")) == [timeout]
        assert ids(await queue.dead_jobs(since=now - 2 * hour)) == [timeout, emails]
        assert ids(await queue.dead_jobs(until=now - 2 * hour)) == [old]
        window = await queue.dead_jobs(since=now - 2 * hour, until=now - timedelta(minutes=30))
        assert ids(window) == [emails]
        assert ids(await queue.dead_jobs(limit=2)) == [timeout, emails]
        retried = await queue.get_job(timeout + 1)
        assert retried is not None and retried.status == "failed" and retried.dead_at is None


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"limit": 0}, "limit must be an integer from 1 to 10000"),
        ({"limit": 10_001}, "limit must be an integer from 1 to 10000"),
        ({"limit": True}, "limit must be"),
        ({"since": datetime(2030, 1, 1)}, "since must be a timezone-aware datetime"),
        ({"until": "yesterday"}, "until must be a timezone-aware datetime"),
        ({"type": ""}, "type must be"),
        ({"error_type": "x" * 256}, "error_type must be"),
    ],
)
async def test_bad_filters_are_refused(db_url: str, filters: dict[str, Any], message: str) -> None:
    async with Queue(db_url) as queue:
        with pytest.raises(InvalidJobError, match=message):
            await queue.dead_jobs(**filters)
        if "limit" not in filters:
            with pytest.raises(InvalidJobError, match=message):
                await queue.retry_dead(**filters)
        with pytest.raises(InvalidJobError, match="limit must be an integer from 1 to 100000"):
            await queue.retry_dead(limit=100_001)


EVERY_FIELD = """
INSERT INTO worker_jobs (type, tag, user_id, data, cron_schedule, auto_reschedule_on_failure,
    auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
    timeout_seconds, queue, priority, concurrency_key, attempt, started, finished, success,
    result, dead_at, claims)
VALUES ('boom', 'email:42', 7, '{"to": "a@b.c"}', '0 0 1 1 *', true, 1500, 60000, true, 3,
    'exponential', 2.5, 'emails', 5, 'tenant:1', 3, now(), now(), false,
    '{"error": "no", "error_type": "ValueError", "gave_up": "attempt 3 of 3 failed"}', now(), 1)
RETURNING *
"""
FIELDS = ("tag", "type", "user_id", "data", "cron_schedule", "auto_reschedule_on_failure",
          "auto_reschedule_on_failure_delay", "remove_delay", "persistent", "backoff",
          "timeout_seconds", "queue", "priority", "concurrency_key")  # fmt: skip


async def test_retry_job_makes_a_linked_attempt_with_a_fresh_budget(
    sql: psycopg.Connection, db_url: str
) -> None:
    old = sql.execute(EVERY_FIELD).fetchone()
    assert old is not None
    unlimited = dead(sql)
    async with Queue(db_url) as queue:
        new = await queue.retry_job(old["id"])
        assert new is not None and new.id > old["id"]
        assert {f: getattr(new, f) for f in FIELDS} == {f: old[f] for f in FIELDS}
        assert (new.rescheduled_from_job, new.attempt, new.max_attempts) == (old["id"], 4, 6)
        assert new.status == "pending" and new.dead_at is None and new.due <= new.created_at
        before = await queue.get_job(old["id"])
        assert before is not None and before.dead_at is None and before.status == "failed"
        assert before.result == old["result"]  # the dead run's outcome is kept
        assert await queue.retry_job(old["id"]) is None  # redriven already: not dead
        assert await queue.retry_job(new.id) is None  # pending: not dead
        assert await queue.retry_job(999_999_999) is None
        again = await queue.retry_job(unlimited)
        assert again is not None and again.max_attempts is None and again.attempt == 2
        assert await queue.dead_jobs() == []


def _redrive_in_thread(db_url: str, job_id: int, out: list[Any]) -> threading.Thread:
    def run() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            out.append(conn.execute("SELECT qdworker_retry_job(%s)", (job_id,)).fetchone())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_two_concurrent_redrives_of_one_job_make_one_attempt(
    sql: psycopg.Connection, db_url: str
) -> None:
    job_id = dead(sql)
    second: list[Any] = []
    with psycopg.connect(db_url) as first:  # a transaction, held open
        [created] = first.execute("SELECT qdworker_retry_job(%s)", (job_id,)).fetchone() or ()
        thread = _redrive_in_thread(db_url, job_id, second)
        wait_until(
            lambda: sql.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'SELECT qdworker_retry_job%'"
            ).fetchone(),
            what="the second redrive to wait for the first",
        )
        first.commit()
    thread.join(timeout=20)
    assert created is not None and second == [(None,)]
    rows = sql.execute("SELECT id FROM worker_jobs WHERE rescheduled_from_job = %s", (job_id,))
    assert [row["id"] for row in rows] == [created]


async def test_retry_is_skipped_while_another_unfinished_job_has_the_tag(
    sql: psycopg.Connection, db_url: str
) -> None:
    job_id = dead(sql, tag="email:42")
    row = sql.execute("INSERT INTO worker_jobs (type, tag) VALUES ('x', 'email:42') RETURNING id")
    newer = row.fetchone()
    assert newer is not None
    async with Queue(db_url) as queue:
        assert await queue.retry_job(job_id) is None
        pending = await queue.get_job(newer["id"])
        assert pending is not None and pending.status == "pending"  # not cancelled by a redrive
        assert ids(await queue.dead_jobs()) == [job_id]  # still dead
        assert await queue.cancel_job(newer["id"]) == "cancelled"
        redriven = await queue.retry_job(job_id)
    assert redriven is not None and redriven.tag == "email:42"


async def test_retry_dead_redrives_by_filter_oldest_first_bounded(
    sql: psycopg.Connection, db_url: str
) -> None:
    boom = [dead(sql, ago=timedelta(minutes=m)) for m in (50, 40, 30, 20, 10)]
    other = dead(sql, "other", ago=timedelta(minutes=45))
    elsewhere = dead(sql, queue="emails", ago=timedelta(minutes=45))
    async with Queue(db_url) as queue:
        first = await queue.retry_dead(type="boom", queue="default", limit=3)
        assert [job.rescheduled_from_job for job in first] == boom[:3]
        assert all(job.status == "pending" and job.attempt == 2 for job in first)
        left = await queue.dead_jobs()
    assert sorted(ids(left)) == sorted([*boom[3:], other, elsewhere])
    # The SQL form, with the error_type and time filters.
    since = datetime.now(UTC) - timedelta(minutes=25)
    rows = sql.execute(
        "SELECT * FROM qdworker_retry_dead(job_type => 'boom', error_type => 'ValueError',"
        " since => %s, until => now())",
        (since,),
    ).fetchall()
    assert [row["old_id"] for row in rows] == boom[3:]
    assert (
        sql.execute("SELECT * FROM qdworker_retry_dead(error_type => 'JobTimeout')").fetchall()
        == []
    )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="between 1 and 100000"):
        sql.execute("SELECT * FROM qdworker_retry_dead(max_jobs => 100001)")


def test_bulk_redrive_skips_superseded_tags_and_wakes_workers_once(
    sql: psycopg.Connection, db_url: str
) -> None:
    first = dead(sql, tag="report:1", ago=timedelta(minutes=2))
    superseded = dead(sql, tag="report:1", ago=timedelta(minutes=1))
    plain = dead(sql)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN qdworker_jobs")
        rows = sql.execute("SELECT * FROM qdworker_retry_dead()").fetchall()
        heard = list(listener.notifies(timeout=1.0))
    pairs = {row["old_id"]: row["new_id"] for row in rows}
    assert list(pairs) == [first, superseded, plain]
    assert pairs[first] is not None and pairs[plain] is not None and pairs[superseded] is None
    assert [n.payload for n in heard] == ["insert"]
    [still] = sql.execute("SELECT id FROM worker_jobs WHERE dead_at IS NOT NULL").fetchall()
    assert still["id"] == superseded


def test_the_watchdogs_failures_are_dead(sql: psycopg.Connection) -> None:
    running = sql.execute(
        "INSERT INTO worker_jobs (type, started, claims, lease_owner) VALUES"
        " ('stuck', now(), 1, 'w'), ('fine', now(), 1, 'w') RETURNING id"
    ).fetchall()
    stuck, fine = (row["id"] for row in running)
    sql.execute(
        statements.get("complete"),
        {"ids": [stuck, fine], "claims": [1, 1], "success": [False, True],
         "results": ['{"error": "stuck", "error_type": "JobTimeout"}', "{}"]},
    )  # fmt: skip
    rows = sql.execute("SELECT id, dead_at FROM worker_jobs ORDER BY id").fetchall()
    assert [row["dead_at"] is not None for row in rows] == [True, False]


async def test_migration_marks_the_jobs_that_died_before_it(empty_db_url: str) -> None:
    conn = await connection.connect(empty_db_url)
    try:
        await migrate.apply(conn, [m for m in migrate.available() if m.version < 7])
        await conn.execute(
            """INSERT INTO worker_jobs (type, finished, success, result, cancel_requested_at)
            VALUES ('final', now(), false, '{"error_type": "ValueError"}', NULL),
                   ('retried', now(), false, '{"error_type": "ValueError"}', NULL),
                   ('cancelled', now(), false, '{"error_type": "JobCancelled"}', now()),
                   ('replaced', now(), false, '{"error": "Job cancelled due to new job"}', now()),
                   ('ok', now(), true, '{}', NULL), ('pending', NULL, NULL, NULL, NULL)"""
        )
        await conn.execute(
            "INSERT INTO worker_jobs (type, rescheduled_from_job) SELECT 'retry', id"
            " FROM worker_jobs WHERE type = 'retried'"
        )
        await migrate.apply(conn)
    finally:
        await conn.aclose()
    with psycopg.connect(empty_db_url, row_factory=dict_row) as check:
        rows = check.execute("SELECT type, dead_at = finished AS dead FROM worker_jobs").fetchall()
    assert {row["type"] for row in rows if row["dead"]} == {"final"}
