"""``/metrics`` after a run of known jobs: every counter equals what ``worker_jobs`` says, and
so do the totals this supervisor flushed into ``qdworker_throughput``.

A real supervisor (in-process ``serve``) with two real worker processes; the jobs: successes,
failures with a retry, one cancelled while it runs, one timed out, one inserted with plain SQL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from psycopg.rows import dict_row
from waiting import wait_until_async

from qdworker import Config, Manager, serve

SUPPORT = Path(__file__).resolve().parents[1] / "support"
ROOT = SUPPORT.parents[1]
DEADLINE_SECONDS = 60.0
WAIT_SECONDS = 30.0
_SAMPLE = re.compile(r'^(\w+)\{queue="([^"]*)",type="([^"]*)"\} (\S+)$')

#: Each counter and what worker_jobs says it counts, by (queue, type).
DB_COUNTS = {
    "qdworker_jobs_enqueued_total": "true",
    "qdworker_jobs_started_total": "started IS NOT NULL",
    "qdworker_jobs_succeeded_total": "success",
    "qdworker_jobs_failed_total": "NOT success AND result->>'error_type' "
    "NOT IN ('JobTimeout', 'JobCancelled')",
    "qdworker_jobs_timed_out_total": "NOT success AND result->>'error_type' = 'JobTimeout'",
    "qdworker_jobs_cancelled_total": "NOT success AND result->>'error_type' = 'JobCancelled'",
    "qdworker_jobs_retried_total": "NOT success AND EXISTS (SELECT 1 FROM worker_jobs AS r "
    "WHERE r.rescheduled_from_job = j.id AND r.attempt > 1)",
}


def _rows(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def _db_counts(db_url: str) -> dict[str, dict[tuple[str, str], int]]:
    counts: dict[str, dict[tuple[str, str], int]] = {}
    for metric, condition in DB_COUNTS.items():
        rows = _rows(db_url, f"SELECT queue, type, count(*) FILTER (WHERE {condition}) AS n "
                             "FROM worker_jobs AS j GROUP BY queue, type")  # fmt: skip
        counts[metric] = {(r["queue"], r["type"]): r["n"] for r in rows if r["n"]}
    return counts


def _scraped(text: str) -> dict[str, dict[tuple[str, str], int]]:
    found: dict[str, dict[tuple[str, str], int]] = {name: {} for name in DB_COUNTS}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in found and float(match.group(4)):
            found[match.group(1)][(match.group(2), match.group(3))] = int(float(match.group(4)))
    return found


async def _until(check: Any, what: str) -> Any:
    with trio.move_on_after(WAIT_SECONDS):
        return await wait_until_async(check)
    raise AssertionError(f"timed out waiting for {what}")


async def _submit_known_jobs(manager: Manager, db_url: str) -> None:
    retry = {"auto_reschedule_on_failure": True, "max_attempts": 2}
    for i in range(3):
        await manager.submit_job(type="echo", data={"i": i})
    await manager.submit_job(type="boom", data={}, **retry)
    await manager.submit_job(type="boom", data={}, queue="mail", **retry)
    await manager.submit_job(type="boom", data={})  # fails once, no retry
    await manager.submit_job(type="sleep", data={"seconds": 30}, timeout_seconds=0.3)
    victim = await manager.submit_job(type="sleep", data={"seconds": 30}, queue="mail")
    _rows(db_url, "INSERT INTO worker_jobs (type, data, queue) VALUES ('echo', '{}', 'sql')")
    await _until(lambda: _running(db_url, victim.id), "the job to cancel to run")
    _rows(db_url, "SELECT qdworker_cancel_job(%s, 'test')", (victim.id,))


async def _running(db_url: str, job_id: int) -> bool:
    return bool(_rows(db_url, "SELECT 1 FROM test_runs WHERE job_id = %s", (job_id,)))


async def _all_finished(db_url: str) -> bool:
    rows = _rows(db_url, "SELECT count(*) FILTER (WHERE finished IS NULL) AS open, "
                         "count(*) AS n FROM worker_jobs WHERE cron_schedule IS NULL")  # fmt: skip
    return rows[0]["open"] == 0 and rows[0]["n"] == 11  # 9 + 2 retries (and built-in cron)


@pytest.fixture
def runs_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test database with the ``sleep`` job's table; worker processes find the test jobs."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT), str(ROOT)]))
    _rows(db_url, "CREATE TABLE test_runs (job_id bigint, worker_id text)")
    return db_url


async def test_metrics_and_throughput_equal_worker_jobs(runs_db: str) -> None:
    db_url = runs_db
    config = Config(database_url=db_url, worker_count=2, ws_enabled=False, http_port=0,
                    jobs=("qdtest_jobs",))  # fmt: skip
    with trio.fail_after(DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            manager: Manager = await nursery.start(serve, config)
            await _submit_known_jobs(manager, db_url)
            await _until(lambda: _all_finished(db_url), "every job to finish")
            expected = _db_counts(db_url)
            assert expected["qdworker_jobs_retried_total"] == {("default", "boom"): 1,
                                                               ("mail", "boom"): 1}  # fmt: skip
            assert expected["qdworker_jobs_cancelled_total"] == {("mail", "sleep"): 1}
            assert expected["qdworker_jobs_timed_out_total"] == {("default", "sleep"): 1}
            base = f"http://127.0.0.1:{manager.http_port}"
            async with httpx.AsyncClient(base_url=base) as client:

                async def scraped_matches() -> str | None:
                    response = await client.get("/metrics")
                    assert response.status_code == 200
                    return response.text if _scraped(response.text) == expected else None

                text = await _until(scraped_matches, "/metrics to equal worker_jobs")
            _check_histograms_and_gauges(text, expected)
            await manager.shutdown()
    _check_throughput(db_url, expected)
    workers = _rows(db_url, "SELECT slot, restarts, rss_bytes, jobs_run, jobs_failed "
                            "FROM qdworker_workers ORDER BY slot")  # fmt: skip
    assert [w["slot"] for w in workers] == [0, 1]
    assert all(w["rss_bytes"] > 1_000_000 and w["restarts"] == 0 for w in workers)
    assert sum(w["jobs_run"] for w in workers) == 11  # every run (written at exit)
    assert sum(w["jobs_failed"] for w in workers) == 7  # 5 failures, a timeout, a cancel


def _check_histograms_and_gauges(text: str, expected: Mapping[str, Any]) -> None:
    started = expected["qdworker_jobs_started_total"]
    for name in ("qdworker_job_run_seconds", "qdworker_job_pickup_seconds"):
        counts = {k: v for k, v in _scraped_named(text, f"{name}_count").items() if v}
        assert counts == started, name
    assert 'qdworker_queue_due_jobs{queue="default"} 0.0' in text
    assert "qdworker_cluster_workers_alive 2.0" in text
    assert "qdworker_workers_alive 2.0" in text


def _scraped_named(text: str, name: str) -> dict[tuple[str, str], int]:
    found = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            found[(match.group(2), match.group(3))] = int(float(match.group(4)))
    return found


def _check_throughput(db_url: str, expected: Mapping[str, Any]) -> None:
    rows = _rows(db_url, "SELECT queue, type, sum(started) AS started, "
                         "sum(succeeded) AS succeeded, sum(failed) AS failed, "
                         "array_agg(pickup_ms_hist) AS hists FROM qdworker_throughput "
                         "GROUP BY queue, type")  # fmt: skip
    by_key = {(r["queue"], r["type"]): r for r in rows}
    assert {k for k, r in by_key.items() if r["started"]} == set(
        expected["qdworker_jobs_started_total"]
    )
    for key, row in by_key.items():
        assert row["started"] == expected["qdworker_jobs_started_total"].get(key, 0), key
        assert row["succeeded"] == expected["qdworker_jobs_succeeded_total"].get(key, 0), key
        failed = sum(expected[f"qdworker_jobs_{n}_total"].get(key, 0)
                     for n in ("failed", "timed_out", "cancelled"))  # fmt: skip
        assert row["failed"] == failed, key
        assert sum(sum(h) for h in row["hists"]) == row["started"], key
