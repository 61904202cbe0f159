"""Regressions of four bugs, each shown with real processes on a real Postgres:

* a websocket server without a secret on ``LOCALHOST`` or ``[::1]`` (both loopback) did not
  start: the start-up check or the bind refused the spelling;
* ``qdworker status`` counted jobs replaced by the tag rule as failed;
* a killed worker's jobs waited for another worker's next poll;
* a handler that raised while its run was being released at shutdown failed its job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from procs import env_for, running, start_supervisor, start_worker, stop, wait_for
from psycopg.rows import dict_row
from trio_websocket import open_websocket_url

from qdworker import Config, ConfigError, Manager, serve
from qdworker.testing import worker_pids


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def runs_db(db_url: str) -> str:
    """The test database plus the table the ``sleep`` and ``raiseOnCancel`` job types record
    their runs in."""
    query(
        db_url,
        "CREATE TABLE test_runs (job_id bigint, worker_id text, "
        "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    return db_url


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- websocket host


@pytest.fixture
def no_worker_config(db_url: str, tmp_path: Path) -> dict[str, Any]:
    """A supervisor without workers whose websocket server takes any free port."""
    return {"database_url": db_url, "worker_count": 0, "ws_port": 0, "data_dir": tmp_path}


@pytest.mark.parametrize(("ws_host", "url_host"), [("LOCALHOST", "localhost"), ("[::1]", "[::1]")])
async def test_websocket_without_secret_starts_on_every_loopback_spelling(
    no_worker_config: dict[str, Any], ws_host: str, url_host: str
) -> None:
    if ws_host == "[::1]" and not ipv6_loopback():
        pytest.skip("this machine cannot bind the IPv6 loopback address ::1")
    config = Config(http_port=0, ws_host=ws_host, **no_worker_config)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            manager: Manager = await nursery.start(serve, config)
            try:
                port = manager.ws_port
                assert isinstance(port, int) and 0 < port < 65536
                async with open_websocket_url(f"ws://{url_host}:{port}/ws") as ws:
                    hello = json.loads(await ws.get_message())
                assert hello["type"] == "connected", hello
            finally:
                await manager.shutdown()


async def test_websocket_without_secret_on_a_public_address_is_refused(
    no_worker_config: dict[str, Any],
) -> None:
    config = Config(http_port=0, ws_host="0.0.0.0", **no_worker_config)
    with pytest.raises(ConfigError) as refused:
        await serve(config)
    assert "QDWORKER_WS_HOST='0.0.0.0' is not a loopback address" in str(refused.value)


# --------------------------------------------------------------------------- status


def test_status_counts_jobs_replaced_by_the_tag_rule_as_cancelled(db_url: str) -> None:
    # The second insert with the same tag replaces the first, still pending, job.
    query(db_url, "INSERT INTO worker_jobs (type, tag) VALUES ('noop', 'same-tag')")
    query(db_url, "INSERT INTO worker_jobs (type, tag) VALUES ('noop', 'same-tag')")
    # A job that really failed, for contrast.
    query(
        db_url,
        "INSERT INTO worker_jobs (type, started, finished, success, result)"
        """ VALUES ('boom', now(), now(), false, '{"error": "kaboom", "error_type": "ValueError"}')""",
    )
    replaced = query(db_url, "SELECT result FROM worker_jobs WHERE tag = 'same-tag' ORDER BY id")
    assert replaced[0]["result"] == {"error": "Job cancelled due to new job being created"}
    result = subprocess.run(
        [sys.executable, "-m", "qdworker", "status"], env=env_for(db_url),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs_table = result.stdout.split("\n\n")[0]  # queues, workers, cron follow
    counts = dict(line.split() for line in jobs_table.splitlines()[1:])
    assert counts == {
        "running": "0", "due": "1", "scheduled": "0", "succeeded": "0", "cancelled": "1",
        "failed": "1", "dead": "0", "total": "3",
    }, result.stdout  # fmt: skip


# --------------------------------------------------------------------------- a worker dies


def test_jobs_of_a_killed_worker_run_again_at_once_elsewhere(runs_db: str, tmp_path: Path) -> None:
    # The poll (30 s) and the lease (60 s) are far longer than the wait below: only the NOTIFY
    # sent when supervisor A releases its dead worker's jobs can wake supervisor B's worker.
    settings = {
        "WORKER_COUNT": "1",
        "QDWORKER_POLL_INTERVAL": "30",
        "QDWORKER_LEASE_SECONDS": "60",
        "QDWORKER_SHUTDOWN_TIMEOUT": "1",
    }
    log = tmp_path / "supervisors.log"
    runs = "SELECT worker_id FROM test_runs WHERE job_id = %s ORDER BY at"
    listening = (
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'qdworker-listen'"
        " AND datname = current_database()"
    )
    # A's worker runs one job at a time: busy with the sleep job, it takes nothing else.
    with running(start_supervisor(runs_db, log=log, QDWORKER_CONCURRENCY="1", **settings)) as a:
        wait_for(runs_db, listening, lambda rows: len(rows) == 1)
        [job] = query(
            runs_db,
            """INSERT INTO worker_jobs (type, data) VALUES ('sleep', '{"seconds": 30}') RETURNING id""",
        )
        [first] = wait_for(runs_db, runs, lambda rows: len(rows) == 1, params=(job["id"],))
        assert f":{a.pid}:" in first["worker_id"]  # A's worker runs it
        with running(start_supervisor(runs_db, log=log, **settings)) as b:
            wait_for(runs_db, listening, lambda rows: len(rows) == 2)
            # B's worker runs a job of its own: its claims since it started are behind it
            # (the job to rescue was still held then), and it now waits to be woken.
            [marker] = query(
                runs_db, "INSERT INTO worker_jobs (type) VALUES ('record') RETURNING id"
            )
            [ran] = wait_for(runs_db, runs, lambda rows: len(rows) == 1, params=(marker["id"],))
            assert f":{b.pid}:" in ran["worker_id"]
            [doomed] = worker_pids(a.pid)
            os.kill(doomed, signal.SIGKILL)
            # 10 s: far below the 30 s poll and the 60 s lease; a NOTIFY takes milliseconds.
            _, second = wait_for(
                runs_db, runs, lambda rows: len(rows) == 2, timeout=10, params=(job["id"],)
            )
            # B's worker, woken at once: A's replacement worker starts only after its restart
            # delay (0.5 s) and would claim the job then.
            assert f":{b.pid}:" in second["worker_id"], (first, second)
            [row] = query(
                runs_db,
                "SELECT lost_runs, attempt, lease_owner FROM worker_jobs WHERE id = %s",
                (job["id"],),
            )
            assert (row["lost_runs"], row["attempt"]) == (1, 2)  # its worker really died
            assert row["lease_owner"] == second["worker_id"]
            assert stop(b) == 0
        assert stop(a) == 0
    released = [line for line in log.read_text().splitlines() if "released them" in line]
    assert len(released) == 1 and f"worker {first['worker_id']} ended" in released[0], released


# --------------------------------------------------------------------------- shutdown


def test_handler_raising_while_released_at_shutdown_gives_its_job_back(runs_db: str) -> None:
    [job] = query(runs_db, "INSERT INTO worker_jobs (type) VALUES ('raiseOnCancel') RETURNING id")
    with running(start_worker(runs_db, QDWORKER_SHUTDOWN_TIMEOUT="0.5")) as worker:
        # The handler runs (it recorded its start): SIGTERM gives it 0.5 s, then cancels it,
        # and it answers the cancellation with a ValueError.
        wait_for(
            runs_db,
            "SELECT 1 FROM test_runs WHERE job_id = %s",
            lambda rows: len(rows) == 1,
            params=(job["id"],),
        )
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    [row] = query(
        runs_db,
        "SELECT started, finished, success, result, attempt, lost_runs, lease_owner"
        " FROM worker_jobs WHERE id = %s",
        (job["id"],),
    )
    # Given back, pending again as if never claimed: not failed, not counted as an attempt.
    assert row == {
        "started": None, "finished": None, "success": None, "result": None, "attempt": 1,
        "lost_runs": 0, "lease_owner": None,
    }  # fmt: skip
