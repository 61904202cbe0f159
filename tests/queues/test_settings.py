"""Queue settings three ways (API, command line, plain SQL), checked input, the queue list,
and what a job's queue fields become in its retries and in an inline worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from qdworker import InvalidJobError, InvalidQueueError, Queue, job
from qdworker.testing import InlineWorker


def _rows(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


SETTINGS = ("SELECT name, paused, concurrency, key_concurrency, rate_limit, rate_period_ms, "
            "fair, key_weights FROM worker_queues ORDER BY name")  # fmt: skip


async def test_set_queue_changes_only_what_it_is_given(db_url: str) -> None:
    async with Queue(db_url) as queue:
        await queue.set_queue("emails", rate_limit=10, rate_period_ms=500)
        await queue.set_queue("emails", concurrency=4)
        await queue.pause_queue("emails")
        await queue.set_queue("emails", rate_limit=None, fair=True, key_weights={"t:1": 2})
        assert _rows(db_url, SETTINGS) == [
            {"name": "emails", "paused": True, "concurrency": 4, "key_concurrency": None,
             "rate_limit": None, "rate_period_ms": 500, "fair": True, "key_weights": {"t:1": 2}}
        ]  # fmt: skip
        await queue.resume_queue("emails")
        assert _rows(db_url, "SELECT paused FROM worker_queues") == [{"paused": False}]
        assert await queue.reset_queue("emails") is True
        assert await queue.reset_queue("emails") is False
        assert _rows(db_url, SETTINGS) == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"concurrency": 0}, "concurrency must be an integer >= 1"),
        ({"concurrency": 1.5}, "concurrency must be an integer"),
        ({"rate_limit": 100_001}, "rate_limit must be at most"),
        ({"rate_period_ms": None}, "rate_period_ms must be an integer"),
        ({"paused": "yes"}, "paused must be true or false"),
        ({"key_weights": {"t": 0}}, "weight of 't' must be a number > 0"),
        ({"key_weights": ["t"]}, "key_weights must map"),
        ({"colour": "red"}, "unknown queue setting"),
    ],
)
async def test_invalid_settings_are_refused_before_writing(
    db_url: str, settings: dict[str, Any], message: str
) -> None:
    async with Queue(db_url) as queue:
        with pytest.raises(InvalidQueueError, match=message):
            await queue.set_queue("q", **settings)
        with pytest.raises(InvalidQueueError, match="queue name"):
            await queue.set_queue("", concurrency=1)
    assert _rows(db_url, SETTINGS) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"queue": ""}, "queue must be"),
        ({"queue": "x" * 256}, "queue must be"),
        ({"priority": 1.5}, "priority must be an integer"),
        ({"priority": 1_000_001}, "priority must be an integer"),
        ({"concurrency_key": 42}, "concurrency_key must be"),
    ],
)
async def test_invalid_queue_fields_of_a_job_are_refused(
    db_url: str, fields: dict[str, Any], message: str
) -> None:
    async with Queue(db_url) as queue:
        with pytest.raises(InvalidJobError, match=message):
            await queue.submit_job(type="x", **fields)


def test_plain_sql_settings_are_checked_by_the_database(db_url: str) -> None:
    _rows(db_url, "INSERT INTO worker_queues (name) VALUES ('q')")
    for bad in ("concurrency = 0", "key_concurrency = -1", "rate_limit = 0",
                "rate_limit = 100001", "rate_period_ms = 0", "key_weights = '[]'",
                "name = ''"):  # fmt: skip
        with pytest.raises(psycopg.errors.CheckViolation):
            _rows(db_url, f"UPDATE worker_queues SET {bad}")
    with pytest.raises(psycopg.errors.CheckViolation):
        _rows(db_url, "INSERT INTO worker_jobs (type, priority) VALUES ('x', 2000000)")
    with pytest.raises(psycopg.errors.CheckViolation):
        _rows(db_url, "INSERT INTO worker_jobs (type, queue) VALUES ('x', ' ')")


async def test_list_queues_shows_settings_and_depth(db_url: str) -> None:
    _rows(db_url, "INSERT INTO worker_jobs (type, queue, due) VALUES "
                  "('x', 'emails', now() - interval '10 seconds'), ('x', 'emails', now()), "
                  "('x', 'emails', now() + interval '1 hour'), ('x', 'default', now())")  # fmt: skip
    _rows(db_url, "UPDATE worker_jobs SET started = now(), lease_owner = 'w' "
                  "WHERE queue = 'default'")  # fmt: skip
    async with Queue(db_url) as queue:
        await queue.set_queue("reports", concurrency=2)
        listed = {q.name: q for q in await queue.list_queues()}
    assert sorted(listed) == ["default", "emails", "reports"]
    emails = listed["emails"]
    assert (emails.due, emails.scheduled, emails.running, emails.concurrency) == (2, 1, 0, None)
    assert emails.oldest_due_seconds is not None and emails.oldest_due_seconds >= 10
    assert (listed["default"].running, listed["default"].due) == (1, 0)
    assert (listed["reports"].concurrency, listed["reports"].due) == (2, 0)


def _cli(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"DATABASE_URL": db_url, "QDWORKER_WS": "false", "PATH": "/usr/bin:/bin",
           "QDWORKER_DATA_DIR": str(tmp_path / "unused")}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "qdworker", "queue", *args], env=env,
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


def test_queue_command(db_url: str, tmp_path: Path) -> None:
    done = _cli(db_url, tmp_path, "set", "emails", "--rate", "10/500ms", "--concurrency", "3",
                "--fair", "--weight", "t:1=2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = _cli(db_url, tmp_path, "set", "emails", "--concurrency", "none")
    assert done.returncode == 0, done.stderr
    assert _cli(db_url, tmp_path, "pause", "emails").returncode == 0
    assert _rows(db_url, SETTINGS) == [
        {"name": "emails", "paused": True, "concurrency": None, "key_concurrency": None,
         "rate_limit": 10, "rate_period_ms": 500, "fair": True, "key_weights": {"t:1": 2.0}}
    ]  # fmt: skip
    _rows(db_url, "INSERT INTO worker_jobs (type, queue) VALUES ('x', 'emails')")
    listed = _cli(db_url, tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    [head, line] = listed.stdout.splitlines()
    assert head.split()[:5] == ["queue", "state", "due", "scheduled", "running"]
    assert line.split()[:5] == ["emails", "paused", "1", "0", "0"]
    assert "rate=10/500ms fair" in line
    bad = _cli(db_url, tmp_path, "set", "emails", "--concurrency", "0")
    assert bad.returncode == 1 and "concurrency must be an integer >= 1" in bad.stderr
    assert _cli(db_url, tmp_path, "reset", "emails").returncode == 0
    assert _rows(db_url, SETTINGS) == []


@job("queues.fail")
async def fail_once(ctx: Any) -> None:
    raise RuntimeError("again")


async def test_retries_keep_queue_priority_and_key(db_url: str) -> None:
    async with Queue(db_url) as queue:
        first = await queue.submit_job(
            type="queues.fail", queue="reports", priority=3, concurrency_key="t:1",
            auto_reschedule_on_failure=True, max_attempts=2,
        )  # fmt: skip
    async with InlineWorker(db_url, types=["queues.fail"]) as worker:
        await worker.run_due()
    [retry] = _rows(db_url, "SELECT queue, priority, concurrency_key FROM worker_jobs "
                            "WHERE rescheduled_from_job = %s", (first.id,))  # fmt: skip
    assert retry == {"queue": "reports", "priority": 3, "concurrency_key": "t:1"}


async def test_inline_worker_claims_limited_and_paused_queues_as_workers_do(db_url: str) -> None:
    _rows(db_url, "INSERT INTO worker_queues (name, concurrency, paused) VALUES "
                  "('limited', 1, false), ('stopped', NULL, true)")  # fmt: skip
    _rows(db_url, "INSERT INTO worker_jobs (type, queue) VALUES ('queues.fail', 'limited'), "
                  "('queues.fail', 'limited'), ('queues.fail', 'stopped')")  # fmt: skip
    async with InlineWorker(db_url, types=["queues.fail"]) as worker:
        runs = await worker.run_due()
    # One claim: what the limit allows (one of the two), nothing from the paused queue.
    assert [r.job.queue for r in runs] == ["limited"]
