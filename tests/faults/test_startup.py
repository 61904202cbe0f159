"""Fault 8: the database refuses the connection. ``python -m qdworker`` exits with one clear
line when it cannot start (nothing listens, a wrong password, every connection slot taken),
at once when waiting cannot help; a running supervisor rides out a full server and works
again when slots are free."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from chaos import eventually, log_lines, query
from procs import env_for, running, start_supervisor, stop, wait_until

from qdworker.testing import PostgresServer, TestDatabases, worker_pids

pytestmark = pytest.mark.faults

PASSWORD = "sekret-Start-8"
#: A server with few connection slots, none reserved (PG 18: superuser_reserved_connections
#: and reserved_connections), so that a superuser can fill every one of them.
SMALL_SERVER = {
    "max_connections": "20",
    "superuser_reserved_connections": "0",
    "reserved_connections": "0",
}
#: Bound of a start-up that must fail; only a hang comes near it.
RUN_TIMEOUT_SECONDS = 90


@pytest.fixture
def small_pg() -> Iterator[PostgresServer]:
    with PostgresServer.create(settings=SMALL_SERVER) as server:
        server.start()
        yield server


def run_qdworker(url: str, **settings: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``python -m qdworker`` until it exits; its result and how long it ran."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "qdworker"], env=env_for(url, **settings),
        capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False,
    )  # fmt: skip
    return result, time.monotonic() - started


def the_error_line(stderr: str) -> str:
    """The one ``qdworker: error: ...`` line; no traceback anywhere."""
    errors = [line for line in stderr.splitlines() if line.startswith("qdworker: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def take_free_slots(url: str, into: list[psycopg.Connection]) -> None:
    """Open idle connections until the server refuses one for want of a slot."""
    for _ in range(100):
        try:
            into.append(psycopg.connect(url, autocommit=True, connect_timeout=5))
        except psycopg.OperationalError as exc:
            assert "too many clients already" in str(exc), exc
            return
    raise AssertionError("the server never ran out of connection slots")


@contextmanager
def all_slots_taken(url: str) -> Iterator[list[psycopg.Connection]]:
    """Every connection slot of the server is held by an idle connection of the test (the
    first is free for the test's own statements); all are closed when the block is left."""
    conns: list[psycopg.Connection] = []
    try:
        take_free_slots(url, conns)
        assert conns, "no slot was free to begin with"
        yield conns
    finally:
        for conn in conns:
            conn.close()


def test_nothing_listening_exits_after_the_startup_timeout_with_one_line() -> None:
    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
        result, elapsed = run_qdworker(url, QDWORKER_STARTUP_TIMEOUT="1")
    print(f"nothing listening: exit {result.returncode} after {elapsed:.2f} s (timeout 1 s)")
    assert result.returncode == 1, result.stderr
    line = the_error_line(result.stderr)
    assert "Connection refused" in line and "is Postgres running?" in line, line
    assert "waited 1 s: QDWORKER_STARTUP_TIMEOUT" in line, line
    assert PASSWORD not in result.stderr + result.stdout
    # It retried for the 1 s it was given, then gave up: the default (10 s) would mean the
    # setting was ignored.
    assert 1 <= elapsed < 9, elapsed


def test_wrong_password_exits_at_once(pg: PostgresServer) -> None:
    # Password authentication for one role, ahead of the test server's trust lines. Written
    # in place, so the file keeps its owner (the Postgres user) and mode.
    hba = pg.data_dir / "pg_hba.conf"
    rules = hba.read_text()
    with open(hba, "r+") as f:
        f.write(f"host all pwuser 127.0.0.1/32 scram-sha-256\n{rules}")
    query(pg.url(), f"CREATE ROLE pwuser LOGIN PASSWORD '{PASSWORD}'")
    [reloaded] = query(pg.url(), "SELECT pg_reload_conf() AS ok")
    assert reloaded["ok"]
    right = f"postgresql://pwuser:{PASSWORD}@{pg.host}:{pg.port}/postgres"
    wrong = right.replace(PASSWORD, "not-the-Password")
    psycopg.connect(right).close()  # the rule is in force and the role can log in

    result, elapsed = run_qdworker(wrong, QDWORKER_STARTUP_TIMEOUT="30")
    print(f"wrong password: exit {result.returncode} after {elapsed:.2f} s (timeout 30 s)")
    assert result.returncode == 1, result.stderr
    line = the_error_line(result.stderr)
    assert "wrong password" in line, line
    assert "QDWORKER_STARTUP_TIMEOUT" not in line, line  # it did not wait
    assert "not-the-Password" not in result.stderr and PASSWORD not in result.stderr
    # Waiting cannot fix a password: it exits at once, not after the 30 s start-up timeout.
    assert elapsed < 10, elapsed


def test_full_server_at_start_exits_naming_too_many_connections(small_pg: PostgresServer) -> None:
    with all_slots_taken(small_pg.url()):
        result, elapsed = run_qdworker(small_pg.url(), QDWORKER_STARTUP_TIMEOUT="2")
    print(f"full server at start: exit {result.returncode} after {elapsed:.2f} s (timeout 2 s)")
    assert result.returncode == 1, result.stderr
    line = the_error_line(result.stderr)
    assert "too many connections" in line, line
    assert "waited 2 s: QDWORKER_STARTUP_TIMEOUT" in line, line
    # Slots may free up: it waited the start-up timeout (2 s) before it gave up.
    assert 2 <= elapsed < 12, elapsed


def refused_attempts(server: PostgresServer) -> int:
    """Connections the server refused for want of a slot (its log has one line each)."""
    return server.log_file.read_text(errors="replace").count("too many clients already")


def test_running_supervisor_rides_out_a_full_server(
    small_pg: PostgresServer, tmp_path: Path
) -> None:
    url = TestDatabases(small_pg.url()).create_template()
    log = tmp_path / "supervisor.log"
    settings = {
        "WORKER_COUNT": "1",
        "QDWORKER_DB_TIMEOUT": "2",
        "QDWORKER_POLL_INTERVAL": "1",
        "QDWORKER_LEASE_SECONDS": "3",
    }
    with running(start_supervisor(url, log=log, **settings)) as supervisor:
        # Started: the worker is registered and listening.
        eventually(url, "SELECT count(*) AS n FROM qdworker_workers", lambda r: r[0]["n"] == 1)
        eventually(
            url,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'qdworker-listen'",
            lambda r: r[0]["n"] == 1,
        )
        workers = worker_pids(supervisor.pid)
        assert len(workers) == 1
        processes = [supervisor.pid, *workers]
        with all_slots_taken(small_pg.url()) as fillers:
            # Frozen, the supervisor and its worker cannot take back the slots their
            # terminated connections free: the test's own connections take them.
            for pid in processes:
                os.kill(pid, signal.SIGSTOP)
            try:
                control = fillers[0]
                backends = [
                    row[0]
                    for row in control.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'qdworker-%'"
                    )
                ]
                assert backends
                control.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (backends,)
                )
                wait_until(lambda: all(not Path(f"/proc/{pid}").exists() for pid in backends))
                before = len(fillers)
                take_free_slots(small_pg.url(), fillers)
                assert len(fillers) - before == len(backends)
                refused = refused_attempts(small_pg)
            finally:
                for pid in processes:
                    os.kill(pid, signal.SIGCONT)
            # Both processes find their connections gone and cannot open new ones.
            wait_until(lambda: len(log_lines(log, "database unreachable")) >= 2)
            # They keep trying (backoff, at most 1 s apart) and do not exit: a few dozen
            # attempts of their connections take some seconds.
            wait_until(lambda: refused_attempts(small_pg) >= refused + 30)
            assert supervisor.poll() is None
            assert worker_pids(supervisor.pid) == workers
        # Slots are free again: a new job runs (the poll is 1 s, reconnects at most 1 s apart).
        freed = time.monotonic()
        [job] = query(url, "INSERT INTO worker_jobs (type) VALUES ('noop') RETURNING id")
        [done] = eventually(
            url,
            f"SELECT success FROM worker_jobs WHERE id = {job['id']} AND finished IS NOT NULL",
            lambda rows: len(rows) == 1,
            timeout=30,
        )
        print(f"full server while running: a job ran {time.monotonic() - freed:.2f} s after")
        assert done["success"] is True
        assert worker_pids(supervisor.pid) == workers  # the same worker process ran it
        assert stop(supervisor) == 0
    unreachable = log_lines(log, "database unreachable")
    # One warning per process for the whole outage, naming the cause.
    assert len([line for line in unreachable if "[w=" not in line]) == 1, unreachable
    assert len([line for line in unreachable if "[w=" in line]) == 1, unreachable
    assert all("too many connections" in line for line in unreachable), unreachable
    assert len(log_lines(log, "database reachable again")) == 2
    assert not log_lines(log, "Traceback")
