"""Smoke test of ``python -m qdworker bench``: tiny sizes, the JSON lines' shape (no timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"workload", "n", "seconds", "jobs_per_s", "settings"}


def _bench(db_url: str, *args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QDWORKER_", "WORKER_"))}
    env["DATABASE_URL"] = db_url  # the bench makes (and drops) its scratch database on this server
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        # `python -m qdworker._benchmark ARGS` is `python -m qdworker bench ARGS`.
        [sys.executable, "-m", "qdworker", "bench", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_bench_json_lines(pg_server_url: str) -> None:
    figures = _bench(
        pg_server_url,
        "--n",
        "200",
        "--n-enqueue",
        "20",
        "--wakeup-n",
        "5",
        "--steady-rate",
        "50",
        "--steady-seconds",
        "0.4",
        "--clients",
        "2",
        "--workloads",
        "drain,enqueue,enqueue_batch,wakeup,steady,scaling,cost",
    )
    by = {}
    for f in figures:
        assert set(f) >= FIELDS, f
        assert f["settings"]["concurrency"] == 10  # defaults
        by.setdefault(f["workload"], []).append(f)
    assert set(by) == {
        "drain",
        "enqueue",
        "enqueue_batch",
        "wakeup",
        "steady",
        "scaling",
        "cost",
        "drain_clients",
    }
    assert by["drain"][0]["n"] == 200 and by["drain"][0]["jobs_per_s"] > 0
    assert "startup_s" in by["drain"][0]
    assert [f["worker_count"] for f in by["scaling"]] == [1, 2, 4]
    assert [f["settings"]["worker_count"] for f in by["scaling"]] == [1, 2, 4]
    for name in ("wakeup", "steady"):
        f = by[name][0]
        assert f["n"] == (5 if name == "wakeup" else 20)
        assert f["p50_ms"] <= f["p95_ms"] <= f["p99_ms"]
    assert by["enqueue"][0]["n"] == 20 and by["enqueue_batch"][0]["n"] == 200
    cost = by["cost"][0]
    assert set(cost["cpu_s_per_1k"]) == {
        "workers",
        "supervisor",
        "postgres_drain",
        "postgres_insert",
    }
    assert cost["worker_rss_mb_before"] and cost["worker_rss_mb_after"]
    clients = by["drain_clients"][0]["clients"]
    assert clients["connected"] == 2
    # Dev mode: every client is an admin and sees every job's started + succeeded events.
    assert clients["job_events_received"] == [400, 400]


def test_bench_rejects_unknown_workload() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qdworker", "bench", "--workloads", "drain,nope"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "nope" in proc.stderr


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bench_rejects_bad_n(value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qdworker", "bench", "--n", value],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
