"""The worker_jobs schema as plain-SQL users see it: defaults, CHECKs, the tag rule."""

from __future__ import annotations

import threading
from datetime import timedelta

import psycopg
import pytest

from qdworker._db import connection, migrate

CANCELLED = {"error": "Job cancelled due to new job being created"}


def test_minimal_insert_gets_defaults(sql: psycopg.Connection) -> None:
    row = sql.execute(
        "INSERT INTO worker_jobs (type, data) VALUES ('sendEmail', '{\"to\": \"a@b.c\"}') "
        "RETURNING *, now() AS db_now"
    ).fetchone()
    assert row is not None
    assert row["user_id"] == 0
    assert row["tag"] == f"job:{row['id']}"
    assert row["due"] == row["db_now"]
    assert row["remove_at"] == row["due"] + timedelta(hours=1)
    assert row["started"] is None and row["finished"] is None and row["success"] is None
    assert row["persistent"] is False and row["auto_reschedule_on_failure"] is False
    assert row["attempt"] == 1 and row["max_attempts"] is None and row["backoff"] == "fixed"
    assert row["created_at"] == row["db_now"] == row["updated_at"]


def test_remove_at_follows_remove_delay(sql: psycopg.Connection) -> None:
    row = sql.execute(
        "INSERT INTO worker_jobs (type, remove_delay, due) "
        "VALUES ('x', 90000, now() + interval '10 seconds') RETURNING due, remove_at"
    ).fetchone()
    assert row is not None
    assert row["remove_at"] - row["due"] == timedelta(seconds=90)


def test_client_clock_is_ignored_for_created_at(sql: psycopg.Connection) -> None:
    row = sql.execute(
        "INSERT INTO worker_jobs (type, created_at) VALUES ('x', '2000-01-01') "
        "RETURNING created_at, now() AS db_now"
    ).fetchone()
    assert row is not None and row["created_at"] == row["db_now"]


@pytest.mark.parametrize(
    ("columns", "values", "constraint"),
    [
        ("type", "''", "worker_jobs_type_check"),
        ("type", "'   '", "worker_jobs_type_check"),
        ("type", "repeat('x', 256)", "worker_jobs_type_check"),
        ("type, tag", "'x', ''", "worker_jobs_tag_check"),
        ("type, tag", "'x', repeat('t', 300)", "worker_jobs_tag_check"),
        ("type, data", "'x', '[1, 2]'", "worker_jobs_data_check"),
        ("type, data", "'x', '\"text\"'", "worker_jobs_data_check"),
        ("type, remove_delay", "'x', -1", "worker_jobs_remove_delay_check"),
        ("type, auto_reschedule_on_failure_delay", "'x', -5", "worker_jobs_delay_check"),
        ("type, user_id", "'x', -1", "worker_jobs_user_id_check"),
        ("type, max_attempts", "'x', 0", "worker_jobs_max_attempts_check"),
        ("type, backoff", "'x', 'random'", "worker_jobs_backoff_check"),
        ("type, timeout_seconds", "'x', 0", "worker_jobs_timeout_check"),
        ("type, on_tag_conflict", "'x', 'skip'", "worker_jobs_on_tag_conflict_check"),
    ],
)
def test_check_constraints_reject_nonsense(
    sql: psycopg.Connection, columns: str, values: str, constraint: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        sql.execute(f"INSERT INTO worker_jobs ({columns}) VALUES ({values})")
    assert info.value.diag.constraint_name == constraint
    assert constraint in str(info.value)


def test_type_is_required(sql: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.NotNullViolation):
        sql.execute("INSERT INTO worker_jobs (data) VALUES ('{}')")


def test_tag_rule_cancels_pending_only(sql: psycopg.Connection) -> None:
    pending = sql.execute(
        "INSERT INTO worker_jobs (type, tag) VALUES ('x', 't') RETURNING id"
    ).fetchone()
    running = sql.execute(
        "INSERT INTO worker_jobs (type, tag) VALUES ('x', 'u') RETURNING id"
    ).fetchone()
    assert pending is not None and running is not None
    sql.execute("UPDATE worker_jobs SET started = now() WHERE id = %s", (running["id"],))
    sql.execute("INSERT INTO worker_jobs (type, tag) VALUES ('x', 't'), ('x', 'u')")
    rows = {r["id"]: r for r in sql.execute("SELECT * FROM worker_jobs ORDER BY id")}
    assert rows[pending["id"]]["finished"] is not None
    assert rows[pending["id"]]["success"] is False
    assert rows[pending["id"]]["result"] == CANCELLED
    assert rows[running["id"]]["finished"] is None  # running jobs are left alone
    open_by_tag = sql.execute(
        "SELECT tag, count(*) AS n FROM worker_jobs WHERE started IS NULL AND finished IS NULL "
        "GROUP BY tag ORDER BY tag"
    ).fetchall()
    assert [(r["tag"], r["n"]) for r in open_by_tag] == [("t", 1), ("u", 1)]


def test_default_tags_replace_nothing(sql: psycopg.Connection) -> None:
    sql.execute("INSERT INTO worker_jobs (type) SELECT 'x' FROM generate_series(1, 50)")
    row = sql.execute(
        "SELECT count(*) AS n FROM worker_jobs WHERE finished IS NULL AND started IS NULL"
    ).fetchone()
    assert row is not None and row["n"] == 50


def test_tag_rule_race_leaves_one_pending_row(db_url: str) -> None:
    """8 connections insert the same tag at once: exactly one pending row remains."""
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def insert() -> None:
        try:
            with psycopg.connect(db_url) as conn:
                conn.execute("SELECT 1")
                barrier.wait(timeout=10)
                for _ in range(10):
                    conn.execute("INSERT INTO worker_jobs (type, tag) VALUES ('x', 'race')")
                    conn.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=insert) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    with psycopg.connect(db_url) as conn:
        pending, total = conn.execute(
            "SELECT count(*) FILTER (WHERE finished IS NULL), count(*) FROM worker_jobs "
            "WHERE tag = 'race'"
        ).fetchone() or (None, None)
    assert (pending, total) == (1, 80)


def test_insert_notifies_workers(db_url: str) -> None:
    with (
        psycopg.connect(db_url, autocommit=True) as listener,
        psycopg.connect(db_url, autocommit=True) as writer,
    ):
        listener.execute("LISTEN qdworker_jobs")
        writer.execute("INSERT INTO worker_jobs (type) SELECT 'x' FROM generate_series(1, 3)")
        notes = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in notes] == ["qdworker_jobs"]
        assert len(notes[0].payload) < 16  # a hint, never data
        # one per statement, not per row
        assert list(listener.notifies(timeout=0.2)) == []


def test_cancel_job_function(sql: psycopg.Connection) -> None:
    job = sql.execute("INSERT INTO worker_jobs (type) VALUES ('x') RETURNING id").fetchone()
    assert job is not None
    outcome = sql.execute("SELECT qdworker_cancel_job(%s, 'stop')", (job["id"],)).fetchone()
    assert outcome is not None and outcome["qdworker_cancel_job"] == "cancelled"
    row = sql.execute(
        "SELECT success, result FROM worker_jobs WHERE id = %s", (job["id"],)
    ).fetchone()
    assert row == {
        "success": False,
        "result": {"error": "Job cancelled: stop", "error_type": "JobCancelled"},
    }
    again = sql.execute("SELECT qdworker_cancel_job(%s)", (job["id"],)).fetchone()
    assert again is not None and again["qdworker_cancel_job"] == "finished"
    missing = sql.execute("SELECT qdworker_cancel_job(-1)").fetchone()
    assert missing is not None and missing["qdworker_cancel_job"] == "not_found"


SCHEMA_QUERY = """
SELECT c.table_name, c.column_name, c.data_type, c.is_nullable, c.column_default
  FROM information_schema.columns c
 WHERE c.table_schema = 'public' AND c.table_name LIKE '%worker%'
 ORDER BY c.table_name, c.ordinal_position
"""


async def test_migrations_give_the_schema_and_rerun_is_noop(empty_db_url: str, db_url: str) -> None:
    conn = await connection.connect(empty_db_url)
    try:
        applied = await migrate.apply(conn)
        assert applied == [m.version for m in migrate.available()]
        assert await migrate.apply(conn) == []
        fresh = await conn.execute(SCHEMA_QUERY)
    finally:
        await conn.aclose()
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as template:
        assert fresh == template.execute(SCHEMA_QUERY).fetchall()
    names = [row["column_name"] for row in fresh if row["table_name"] == "worker_jobs"]
    for column in [
        "id",
        "tag",
        "type",
        "user_id",
        "data",
        "due",
        "started",
        "finished",
        "remove_at",
        "success",
        "result",
        "cron_schedule",
        "auto_reschedule_on_failure",
        "auto_reschedule_on_failure_delay",
        "remove_delay",
        "rescheduled_from_job",
        "persistent",
        "created_at",
        "updated_at",
    ]:
        assert column in names


async def test_concurrent_migrators_do_not_race(empty_db_url: str) -> None:
    import trio

    results: list[list[int]] = []

    async def one() -> None:
        conn = await connection.connect(empty_db_url)
        try:
            results.append(await migrate.apply(conn))
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    assert sorted(len(r) for r in results) == [0, 0, 0, len(migrate.available())]


def test_claim_returns_the_job_fields_in_order(sql: psycopg.Connection) -> None:
    from qdworker._db import statements
    from qdworker._model import COLUMNS

    sql.execute("INSERT INTO worker_jobs (type) VALUES ('x')")
    cur = sql.execute(
        statements.get("claim"),
        {"limit": 1, "owner": "t", "lease_seconds": 5, "types": ["x"], "rescue": True,
         "queues": None, "cursor_queues": [], "cursor_orders": [], "cursor_ids": []},
    )  # fmt: skip
    assert cur.description is not None
    assert [c.name for c in cur.description] == [*COLUMNS, "lost", "run_order"]
