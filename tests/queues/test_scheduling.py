"""Which job starts first and where, across two supervisors of two workers each: priorities
(higher first) with aging (a low-priority job under a constant stream of higher-priority
work still starts, within the documented bound), pause and resume (no start after the pause
commits; a resume is heard at once, not at the next poll), and QDWORKER_QUEUES (a host
dedicated to some queues)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import psycopg
import trio
from procs import running, start_supervisor, stop, wait_for
from psycopg.rows import dict_row
from spans import two_supervisors

from qdworker import Queue

#: A poll interval long enough that anything faster was a NOTIFY.
LONG_POLL = "30"


def _rows(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def test_higher_priority_starts_first(db_url: str) -> None:
    _rows(db_url, "INSERT INTO worker_jobs (type, data, priority) "
                  "SELECT 'sleep', '{\"seconds\": 0.05}', 0 FROM generate_series(1, 200) "
                  "RETURNING id")  # fmt: skip
    _rows(db_url, "INSERT INTO worker_jobs (type, data, priority) "
                  "SELECT 'sleep', '{\"seconds\": 0.05}', 5 FROM generate_series(1, 40) "
                  "RETURNING id")  # fmt: skip
    _rows(db_url, "CREATE TABLE test_runs (job_id bigint, worker_id text, at timestamptz)")
    with two_supervisors(db_url, QDWORKER_CONCURRENCY="1"):
        wait_for(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE type = 'sleep' "
                 "AND finished IS NULL", lambda rows: rows[0]["n"] == 0, timeout=120)  # fmt: skip
    [row] = _rows(
        db_url,
        "SELECT count(*) AS n FROM worker_jobs WHERE priority = 0 AND started < "
        "(SELECT max(started) FROM worker_jobs WHERE priority = 5)",
    )
    print(f"\npriorities: {row['n']} of 200 priority-0 jobs started before the last of 40 "
          "priority-5 jobs (4 workers, claims in parallel)")  # fmt: skip
    # Claims run in parallel: when the last priority-5 jobs are locked by one worker's claim,
    # another may take priority-0 ones, at most a batch (slot + ready queue) per worker.
    assert row["n"] <= 8


def test_aging_lets_a_low_priority_job_through_a_stream_of_higher_priority(
    db_url: str,
) -> None:
    """The job has waited 50 s (due 50 s ago); one priority step is a minute: higher-priority
    jobs due more than 10 s after it come after it, however many keep arriving."""
    with two_supervisors(db_url, QDWORKER_CONCURRENCY="2"):
        [low] = _rows(db_url, "INSERT INTO worker_jobs (type, data, priority, due) VALUES "
                      "('sleep', '{\"seconds\": 0.1}', 0, now() - interval '50 seconds') "
                      "RETURNING id, created_at")  # fmt: skip
        _rows(db_url, "CREATE TABLE test_runs (job_id bigint, worker_id text, at timestamptz)")
        # 8 slots at ~10 jobs/s each: 100 jobs/s of priority 1 keeps them all busy for good.
        started_at: Any = None
        deadline = time.monotonic() + 60
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
            while started_at is None and time.monotonic() < deadline:
                conn.execute("INSERT INTO worker_jobs (type, data, priority) "
                             "SELECT 'sleep', '{\"seconds\": 0.1}', 1 FROM generate_series(1, 10)")  # fmt: skip
                started_at = conn.execute(
                    "SELECT started FROM worker_jobs WHERE id = %s", (low["id"],)
                ).fetchone()["started"]  # type: ignore[index]
                time.sleep(0.1)
            [waiting] = conn.execute(
                "SELECT count(*) AS n FROM worker_jobs WHERE priority = 1 AND started IS NULL"
            ).fetchall()
    assert started_at is not None, "the low-priority job never started"
    waited = started_at - low["created_at"]
    print(f"\naging: the low-priority job started {waited.total_seconds():.1f} s into a stream "
          f"of priority-1 work ({waiting['n']} such jobs still waiting)")  # fmt: skip
    assert waiting["n"] > 0  # the higher-priority stream had not dried up
    # Bound: 10 s of aging plus running what was due ahead of it (a generous margin).
    assert waited < timedelta(seconds=40)


def test_pause_stops_starts_and_resume_is_heard_at_once(db_url: str) -> None:
    async def pause_and_resume() -> tuple[Any, Any]:
        async with Queue(db_url) as client:
            await client.pause_queue("default")
            [paused] = _rows(db_url, "SELECT updated_at FROM worker_queues")
            jobs = await client.submit_jobs([{"type": "noop"} for _ in range(50)])
            await trio.sleep(2)  # the jobs must stay pending: nothing may start them
            assert _rows(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE id = ANY(%s) "
                                 "AND started IS NOT NULL", ([j.id for j in jobs],)) == [{"n": 0}]  # fmt: skip
            await client.resume_queue("default")
            [resumed] = _rows(db_url, "SELECT updated_at FROM worker_queues")
            return paused["updated_at"], resumed["updated_at"]

    with two_supervisors(db_url, QDWORKER_POLL_INTERVAL=LONG_POLL):
        _rows(db_url, "INSERT INTO worker_jobs (type) SELECT 'noop' FROM generate_series(1, 20)")
        wait_for(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE type = 'noop' "
                 "AND finished IS NULL", lambda rows: rows[0]["n"] == 0)  # fmt: skip
        _, resumed = trio.run(pause_and_resume)
        [last] = wait_for(
            db_url, "SELECT max(started) AS at, count(*) FILTER (WHERE finished IS NULL) AS n "
            "FROM worker_jobs WHERE type = 'noop'", lambda rows: rows[0]["n"] == 0,
        )  # fmt: skip
    delay = (last["at"] - resumed).total_seconds()
    print(f"\nresume: all 50 waiting jobs started within {delay * 1000:.0f} ms")
    assert delay < 5  # a NOTIFY: waiting for the 30 s poll would take far longer


def test_pause_holds_while_a_backlog_drains(db_url: str) -> None:
    _rows(db_url, "INSERT INTO worker_jobs (type, queue, data) "
                  "SELECT 'sleep', 'bulk', '{\"seconds\": 0.01}' FROM generate_series(1, 2000)")  # fmt: skip
    _rows(db_url, "CREATE TABLE test_runs (job_id bigint, worker_id text, at timestamptz)")
    with two_supervisors(db_url):
        wait_for(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE finished IS NOT NULL",
                 lambda rows: rows[0]["n"] >= 100)  # fmt: skip
        _rows(db_url, "INSERT INTO worker_queues (name, paused) VALUES ('bulk', true)")
        [paused] = _rows(db_url, "SELECT clock_timestamp() AS at")  # after the commit
        time.sleep(2)
        [after] = _rows(db_url, "SELECT count(*) AS n, max(started) AS last FROM worker_jobs "
                                "WHERE queue = 'bulk' AND started IS NOT NULL")  # fmt: skip
        [left] = _rows(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE queue = 'bulk' "
                               "AND started IS NULL")  # fmt: skip
    print(f"\npause: {after['n']} of 2000 started before the pause committed, "
          f"{left['n']} left waiting")  # fmt: skip
    assert left["n"] > 0
    assert after["last"] < paused["at"]  # no claim began after the pause committed


def test_a_worker_serves_only_its_queues(db_url: str) -> None:
    _rows(db_url, "CREATE TABLE test_runs (job_id bigint, worker_id text, "
                  "at timestamptz NOT NULL DEFAULT clock_timestamp())")  # fmt: skip
    _rows(db_url, "INSERT INTO worker_jobs (type, queue) "
                  "SELECT 'record', q FROM generate_series(1, 100), "
                  "unnest(ARRAY['default', 'emails', 'reports']) AS q")  # fmt: skip
    with (
        running(start_supervisor(db_url, WORKER_COUNT="2", QDWORKER_QUEUES="emails")) as mail,
        running(start_supervisor(db_url, WORKER_COUNT="2", QDWORKER_QUEUES="default")) as rest,
    ):
        wait_for(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE type = 'record' "
                 "AND queue <> 'reports' AND finished IS NULL",
                 lambda rows: rows[0]["n"] == 0)  # fmt: skip
        time.sleep(1)  # no worker serves 'reports': its jobs must still wait
        assert stop(mail) == 0 and stop(rest) == 0
    where = _rows(
        db_url,
        "SELECT j.queue, split_part(r.worker_id, ':', 2)::int AS supervisor, count(*) AS n "
        "FROM test_runs AS r JOIN worker_jobs AS j ON j.id = r.job_id GROUP BY 1, 2",
    )
    assert {(r["queue"], r["supervisor"], r["n"]) for r in where} == {
        ("emails", mail.pid, 100),
        ("default", rest.pid, 100),
    }
    assert _rows(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE queue = 'reports' "
                         "AND started IS NULL") == [{"n": 100}]  # fmt: skip
