"""``qdworker status`` (and ``--json``) against a running supervisor: queues with due,
scheduled and running jobs and the oldest due age, the workers with what they reported, the
cron schedules with their lag; then the same once the supervisor stopped."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import psycopg
from procs import env_for, running, start_supervisor, stop, wait_for

LIVE_WORKERS = "SELECT id FROM qdworker_workers WHERE stopped_at IS NULL AND rss_bytes > 0"
JOBS = """
INSERT INTO worker_jobs (type, queue, due, data) VALUES
    ('nobody', 'mail', now() - interval '90 seconds', '{}'),
    ('nobody', 'mail', now(), '{}'),
    ('nobody', 'later', now() + interval '1 hour', '{}'),
    ('sleep', 'slow', now(), '{"seconds": 60}');
INSERT INTO worker_jobs (type, tag, data, cron_schedule, due)
VALUES ('nobodyCron', 'cron:nobodyCron', '{}', '*/5 * * * *', now() - interval '30 seconds');
"""


def _sql(db_url: str, query: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(query)


def status(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "qdworker", "status", *args], env=env_for(db_url),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def _by(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {row[key]: row for row in rows}


def test_status_shows_queues_workers_and_cron(db_url: str) -> None:
    _sql(db_url, "CREATE TABLE test_runs (job_id bigint, worker_id text)")
    _sql(db_url, JOBS)
    with running(
        start_supervisor(db_url, WORKER_COUNT="2", QDWORKER_SHUTDOWN_TIMEOUT="0.5")
    ) as supervisor:
        wait_for(db_url, LIVE_WORKERS, lambda rows: len(rows) == 2)
        wait_for(db_url, "SELECT 1 FROM test_runs", lambda rows: len(rows) == 1)
        report = json.loads(status(db_url, "--json").stdout)
        text = status(db_url).stdout
        stop(supervisor)
    queues = _by(report["queues"], "queue")
    assert (queues["mail"]["due"], queues["mail"]["scheduled"]) == (2, 0)
    assert 90 <= queues["mail"]["oldest_due_seconds"] < 120
    assert (queues["later"]["scheduled"], queues["later"]["due"]) == (1, 0)
    assert queues["slow"]["running"] == 1
    assert report["jobs"]["due"] == 3 and report["jobs"]["running"] == 1
    workers = report["workers"]
    assert sorted(w["slot"] for w in workers) == [0, 1]
    assert all(w["alive"] and w["rss_bytes"] > 1_000_000 and w["supervisor"] for w in workers)
    cron = _by(report["cron"], "type")["nobodyCron"]
    assert 30 <= cron["lag_seconds"] < 60 and not cron["running"]
    assert re.search(r"^mail\s+2\s+0\s+0\s+9\d\.\ds$", text, re.MULTILINE), text
    assert re.search(r"^workers: 2 alive of 2 registered$", text, re.MULTILINE), text
    assert re.search(r"^nobodyCron\s+cron:nobodyCron\s+\*/5 \* \* \* \*\s+\S+\s+3\d\.\ds$",
                     text, re.MULTILINE), text  # fmt: skip
    after = json.loads(status(db_url, "--json").stdout)
    assert [w["alive"] for w in after["workers"]] == [False, False]
    assert "workers: 0 alive of 2 registered" in status(db_url).stdout
