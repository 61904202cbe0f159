"""The command line as a user runs it: ``python -m qdworker`` in a real process, real Postgres."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import trio
from waiting import wait_until_async

from qdworker import _config as config

DEADLINE_SECONDS = 30.0


def env_for(db_url: str | None, tmp_path: Path, **settings: str) -> dict[str, str]:
    """A clean environment: no inherited qdworker settings, websocket off."""
    names = {s.env for s in config.SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["QDWORKER_WS"] = "false"
    env["QDWORKER_DATA_DIR"] = str(tmp_path / "unused-data-dir")
    if db_url is not None:
        env["DATABASE_URL"] = db_url
    env.update(settings)
    return env


def qdworker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qdworker", *args],
        env=env, capture_output=True, text=True, timeout=DEADLINE_SECONDS, check=False,
    )  # fmt: skip


class Supervisor:
    """``python -m qdworker`` running in the background; its stderr is read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""

    async def wait_for_line(self, pattern: str) -> str:
        """Read stderr until a line matches ``pattern`` (the caller caps the wait)."""
        regex = re.compile(pattern)
        for line in self.lines:
            if regex.search(line):
                return line
        assert self.process.stderr is not None
        while True:
            chunk = await self.process.stderr.receive_some(65536)
            if not chunk:
                raise AssertionError(f"stderr ended without {pattern!r}:\n" + "\n".join(self.lines))
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if regex.search(line):
                    return line

    async def drain(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some(65536):
            self._buffer += chunk
        self.lines.extend(self._buffer.decode(errors="replace").splitlines())


_started: list[trio.Process] = []


async def start_supervisor(env: dict[str, str], *args: str) -> Supervisor:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "qdworker", *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    _started.append(process)
    return Supervisor(process)


@pytest.fixture(autouse=True)
def _no_supervisor_outlives_its_test() -> Iterator[None]:
    """A test that fails half-way leaves no supervisor (nor its workers) running."""
    yield
    while _started:
        process = _started.pop()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- settings


def test_invalid_flag_value_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = qdworker("--worker-count", "nope", env=env_for(None, tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--worker-count='nope' is invalid: expected an integer >= 0, or 'cpus'" in lines[0]


def test_invalid_env_value_names_the_variable(tmp_path: Path) -> None:
    result = qdworker("status", env=env_for(None, tmp_path, WORKER_COUNT="many"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "qdworker: error: WORKER_COUNT='many' is invalid: expected an integer >= 0, "
        "or 'cpus' (one per CPU)"
    ]


def test_public_websocket_without_secret_is_a_config_error(db_url: str, tmp_path: Path) -> None:
    env = env_for(db_url, tmp_path, QDWORKER_WS="true", QDWORKER_WS_HOST="0.0.0.0")
    result = qdworker(env=env)
    assert result.returncode == 2
    assert "qdworker: error: QDWORKER_WS_HOST='0.0.0.0' is not a loopback address" in result.stderr


def test_help_lists_every_setting_with_its_env_name(tmp_path: Path) -> None:
    result = qdworker("--help", env=env_for(None, tmp_path))
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for setting in config.SETTINGS:
        if setting.flag_allowed:
            assert setting.flag in text and f"Env {setting.env}" in text, setting.env
        else:  # secrets: environment only, never a flag that `ps` would show
            assert setting.flag not in text and setting.env in text, setting.env
    for command in ("run", "migrate", "db", "cancel", "status", "jobs", "retry"):
        assert command in text


# --------------------------------------------------------------------------- database commands


def test_migrate_applies_then_reports_up_to_date(empty_db_url: str, tmp_path: Path) -> None:
    env = env_for(empty_db_url, tmp_path)
    first = qdworker("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == "applied 0001_worker_jobs"
    second = qdworker("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("up to date")
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM worker_jobs").fetchone() == (0,)


def test_cancel_and_status(db_url: str, sql: psycopg.Connection, tmp_path: Path) -> None:
    row = sql.execute("INSERT INTO worker_jobs (type) VALUES ('x') RETURNING id").fetchone()
    assert row is not None
    env = env_for(db_url, tmp_path)
    status = qdworker("status", env=env)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^due\s+1$", status.stdout, re.MULTILINE), status.stdout
    cancelled = qdworker("cancel", str(row["id"]), "--reason", "no longer needed", env=env)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, "cancelled")
    again = qdworker("cancel", str(row["id"]), env=env)
    assert (again.returncode, again.stdout.strip()) == (0, "finished")
    missing = qdworker("cancel", "999999999", env=env)
    assert (missing.returncode, missing.stdout.strip()) == (1, "not_found")
    status = qdworker("status", env=env)
    assert re.search(r"^cancelled\s+1$", status.stdout, re.MULTILINE), status.stdout


DEAD = """INSERT INTO worker_jobs (type, queue, started, finished, success, dead_at, result)
VALUES (%s, %s, now() - %s, now() - %s, false, now() - %s,
        jsonb_build_object('error', %s::text, 'error_type', %s::text)) RETURNING id"""


def _dead_rows(sql: psycopg.Connection) -> list[int]:
    """Three dead jobs: boom/default 3 h ago, boom/emails 1 h ago, other/default 10 min ago
    (with a long message over two lines)."""
    made = []
    for job_type, queue, ago, error, error_type in (
        ("boom", "default", timedelta(hours=3), "kaboom", "ValueError"),
        ("boom", "emails", timedelta(hours=1), "bad address", "ValueError"),
        ("other", "default", timedelta(minutes=10), "slow\n" + "x" * 200, "JobTimeout"),
    ):
        row = sql.execute(DEAD, (job_type, queue, ago, ago, ago, error, error_type)).fetchone()
        assert row is not None
        made.append(int(row["id"]))
    return made


def _listed(result: subprocess.CompletedProcess[str]) -> list[int]:
    assert result.returncode == 0, result.stderr
    return [int(line.split()[0]) for line in result.stdout.splitlines()[1:-1]]  # header, footer


def test_dead_jobs_are_listed_with_filters(
    db_url: str, sql: psycopg.Connection, tmp_path: Path
) -> None:
    old, emails, other = _dead_rows(sql)
    env = env_for(db_url, tmp_path)
    listing = qdworker("jobs", "--dead", env=env)
    assert _listed(listing) == [other, emails, old]
    header, *rows, footer = listing.stdout.splitlines()
    assert header.split()[:5] == ["id", "type", "queue", "attempt", "dead"]
    assert footer == "3 dead job(s)"
    assert "slow x" in rows[0] and rows[0].endswith("…") and len(rows[0]) < 200
    assert re.search(rf"^{emails}\s+boom\s+emails\s+1\s+\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d"
                     r"\s+ValueError\s+bad address$", rows[1]), rows[1]  # fmt: skip
    until = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    for args, expected in (
        (["--type", "boom"], [emails, old]),
        (["--queue", "emails"], [emails]),
        (["--error-type", "JobTimeout"], [other]),
        (["--since", "2h"], [other, emails]),
        (["--until", until], [old]),
        (["--since", "2h", "--until", "30m"], [emails]),
    ):
        assert _listed(qdworker("jobs", "--dead", *args, env=env)) == expected, args
    limited = qdworker("jobs", "--dead", "--limit", "1", env=env)
    assert _listed(limited) == [other] and "more may match" in limited.stdout
    assert qdworker("jobs", "--dead", "--type", "none", env=env).stdout == "no dead jobs\n"
    for bad in (["--since", "yesterday"], ["--limit", "0"], ["--type", ""], []):
        refused = qdworker("jobs", *(["--dead"] if bad else []), *bad, env=env)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, bad


def test_dead_jobs_are_redriven_by_id_and_by_filter(
    db_url: str, sql: psycopg.Connection, tmp_path: Path
) -> None:
    old, emails, other = _dead_rows(sql)
    env = env_for(db_url, tmp_path)
    status = qdworker("status", env=env)
    assert re.search(r"^dead\s+3$", status.stdout, re.MULTILINE), status.stdout
    one = qdworker("retry", str(old), env=env)
    assert one.returncode == 0, one.stderr
    [line, summary] = one.stdout.splitlines()
    new = int(line.split(" -> ")[1])
    assert (line, summary) == (f"{old} -> {new}", "redriven 1, skipped 0")
    again = qdworker("retry", str(old), str(emails), env=env)
    assert again.returncode == 1
    assert again.stdout.splitlines()[0] == f"{old} skipped"
    assert again.stdout.splitlines()[2].startswith("redriven 1, skipped 1 (not dead")
    bulk = qdworker("retry", "--dead", "--error-type", "JobTimeout", "--limit", "5", env=env)
    assert bulk.returncode == 0, bulk.stderr
    assert re.fullmatch(rf"{other} -> \d+\nredriven 1, skipped 0\n", bulk.stdout), bulk.stdout
    row = sql.execute("SELECT count(*) AS n FROM worker_jobs WHERE dead_at IS NOT NULL")
    assert row.fetchone() == {"n": 0}
    links = sql.execute("SELECT rescheduled_from_job AS f FROM worker_jobs WHERE id > %s", (other,))
    assert sorted(r["f"] for r in links) == sorted([old, emails, other])
    for bad in ([], ["1", "--dead"], ["1", "--type", "boom"]):
        refused = qdworker("retry", *bad, env=env)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, bad


def test_db_url_prints_database_url_or_explains(db_url: str, tmp_path: Path) -> None:
    shown = qdworker("db", "url", env=env_for(db_url, tmp_path))
    assert (shown.returncode, shown.stdout.strip()) == (0, db_url)
    none = qdworker("db", "url", env=env_for(None, tmp_path))
    assert none.returncode == 1
    assert "no embedded Postgres is running" in none.stderr


def test_db_psql_runs_psql_on_the_database(db_url: str, tmp_path: Path) -> None:
    env = env_for(db_url, tmp_path)
    result = qdworker("db", "psql", "--", "-tAc", "SELECT count(*) FROM worker_jobs", env=env)
    assert (result.returncode, result.stdout.strip()) == (0, "0"), result.stderr


# --------------------------------------------------------------------------- run


async def test_run_without_workers_stops_on_sigterm_with_exit_0(
    db_url: str, tmp_path: Path
) -> None:
    supervisor = await start_supervisor(env_for(db_url, tmp_path, WORKER_COUNT="0"))
    with trio.fail_after(DEADLINE_SECONDS):
        await supervisor.wait_for_line("supervisor ready: 0 worker")
        supervisor.process.send_signal(signal.SIGTERM)
        await supervisor.drain()
        assert await supervisor.process.wait() == 0, "\n".join(supervisor.lines)
    assert any("supervisor stopped" in line for line in supervisor.lines)
    assert "password" not in "\n".join(supervisor.lines).lower()


async def test_run_restarts_a_crashing_worker_with_backoff(db_url: str, tmp_path: Path) -> None:
    env = env_for(
        db_url, tmp_path, WORKER_COUNT="1", QDWORKER_JOBS="qdworker_no_such_module_for_tests"
    )
    supervisor = await start_supervisor(env)
    with trio.fail_after(DEADLINE_SECONDS):
        await supervisor.wait_for_line("supervisor ready: 1 worker")
        with trio.move_on_after(5.0):  # the measurement window, not synchronisation
            await supervisor.wait_for_line("never printed")
        supervisor.process.send_signal(signal.SIGTERM)
        await supervisor.drain()
        assert await supervisor.process.wait() == 0, "\n".join(supervisor.lines)
    restarts = [line for line in supervisor.lines if "ended unexpectedly" in line]
    assert 2 <= len(restarts) <= 6, "\n".join(supervisor.lines)
    assert any(" error " in line and "in a row" in line for line in restarts)
    # ... naming the cause the worker reported, not a guess
    assert any(
        "cannot import job modules qdworker_no_such_module_for_tests (QDWORKER_JOBS)" in line
        for line in restarts
    ), "\n".join(restarts)


async def test_run_with_a_worker_shuts_down_gracefully(db_url: str, tmp_path: Path) -> None:
    supervisor = await start_supervisor(env_for(db_url, tmp_path, WORKER_COUNT="1"))
    with trio.fail_after(DEADLINE_SECONDS):
        await supervisor.wait_for_line(r"worker \S+:w0\.1 started")
        supervisor.process.send_signal(signal.SIGINT)
        await supervisor.drain()
        assert await supervisor.process.wait() == 0, "\n".join(supervisor.lines)
    assert any("exited cleanly" in line for line in supervisor.lines), "\n".join(supervisor.lines)
    assert not any("ended unexpectedly" in line for line in supervisor.lines)


SUPPORT = Path(__file__).resolve().parent / "support"


def job_env(db_url: str, tmp_path: Path, **settings: str) -> dict[str, str]:
    env = env_for(db_url, tmp_path, QDWORKER_JOBS="qdsup_jobs", **settings)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SUPPORT), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


async def poll(sql: psycopg.Connection, query: str, params: tuple[object, ...]) -> None:
    """Wait until ``query`` returns a row (the caller caps the wait)."""
    await wait_until_async(lambda: sql.execute(query, params).fetchone())


async def test_second_signal_cancels_running_jobs_at_once(
    db_url: str, sql: psycopg.Connection, tmp_path: Path
) -> None:
    env = job_env(db_url, tmp_path, WORKER_COUNT="1", QDWORKER_SHUTDOWN_TIMEOUT="120")
    supervisor = await start_supervisor(env)
    row = sql.execute(
        "INSERT INTO worker_jobs (type, data) VALUES ('supSleep', %s) RETURNING id",
        ('{"seconds": 600}',),
    ).fetchone()
    assert row is not None
    job_id = row["id"]
    with trio.fail_after(DEADLINE_SECONDS):
        await supervisor.wait_for_line("supervisor ready")
        await poll(sql, "SELECT 1 FROM worker_jobs WHERE id = %s AND lease_owner IS NOT NULL",
                   (job_id,))  # fmt: skip
        supervisor.process.send_signal(signal.SIGTERM)
        await supervisor.wait_for_line("shutting down gracefully")
        supervisor.process.send_signal(signal.SIGTERM)  # well before the 120 s are up
        await supervisor.drain()
        assert await supervisor.process.wait() == 0, "\n".join(supervisor.lines)
    assert any("exited cleanly" in line for line in supervisor.lines), "\n".join(supervisor.lines)
    job = sql.execute("SELECT finished FROM worker_jobs WHERE id = %s", (job_id,)).fetchone()
    assert job is not None and job["finished"] is None  # released, to run again later


async def test_jobs_of_a_dead_worker_are_released_at_once(
    db_url: str, sql: psycopg.Connection, tmp_path: Path
) -> None:
    # With a 60 s lease, three lost runs would take minutes if the supervisor did not end the
    # dead worker's leases at once.
    env = job_env(db_url, tmp_path, WORKER_COUNT="1", QDWORKER_LEASE_SECONDS="60",
                  QDWORKER_MAX_LOST_RUNS="2")  # fmt: skip
    supervisor = await start_supervisor(env)
    row = sql.execute("INSERT INTO worker_jobs (type) VALUES ('supDie') RETURNING id").fetchone()
    assert row is not None
    with trio.fail_after(DEADLINE_SECONDS):
        await supervisor.wait_for_line("supervisor ready")
        await poll(sql, "SELECT 1 FROM worker_jobs WHERE id = %s AND finished IS NOT NULL",
                   (row["id"],))  # fmt: skip
        supervisor.process.send_signal(signal.SIGTERM)
        await supervisor.drain()
        assert await supervisor.process.wait() == 0, "\n".join(supervisor.lines)
    job = sql.execute("SELECT success, claims FROM worker_jobs WHERE id = %s", (row["id"],))
    outcome = job.fetchone()
    assert outcome is not None and outcome["success"] is False and outcome["claims"] >= 2
    assert any("released them for other workers" in line for line in supervisor.lines)
