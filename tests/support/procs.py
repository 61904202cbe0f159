"""Real worker and supervisor processes for tests, and bounded waits on database outcomes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parent.parent
T = TypeVar("T")


def env_for(db_url: str, **settings: str) -> dict[str, str]:
    """Environment of a qdworker process on ``db_url`` that can import the test job types."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QDWORKER_", "WORKER_"))}
    env.update(
        {
            "DATABASE_URL": db_url,
            "QDWORKER_JOBS": "qdtest_jobs",
            "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(ROOT)]),
            "QDWORKER_WS": "false",
            "WORKER_LOG_LEVEL": "info",
            "QDWORKER_POLL_INTERVAL": "5",
        }
    )
    env.update(settings)
    return env


def start_worker(db_url: str, **settings: str) -> subprocess.Popen[bytes]:
    """A bare worker child (no supervisor, no IPC)."""
    return subprocess.Popen(
        [sys.executable, "-m", "qdworker.worker"], env=env_for(db_url, **settings)
    )


def start_supervisor(
    db_url: str, *args: str, log: Path | None = None, **settings: str
) -> subprocess.Popen[bytes]:
    """``python -m qdworker ARGS`` on ``db_url``; its output (and its workers') goes to
    ``log`` when given."""
    stderr = None if log is None else open(log, "ab")  # noqa: SIM115 (the child owns it)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "qdworker", *args],
            env=env_for(db_url, **settings),
            start_new_session=True,
            stderr=stderr,
        )
    finally:
        if stderr is not None:
            stderr.close()


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@contextmanager
def running(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(
    db_url: str,
    query: str,
    ready: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 20,
    params: Any = None,
) -> list[dict[str, Any]]:
    """Run ``query`` until ``ready(rows)`` holds; fail after ``timeout`` seconds.

    This waits for an outcome in the database (what the test asserts on), bounded in time;
    it is not a sleep standing in for synchronisation.
    """
    deadline = time.monotonic() + timeout
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        while True:
            rows = conn.execute(query, params).fetchall()
            if ready(rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting on {query!r}: {rows!r}")
            time.sleep(0.02)


def wait_until(predicate: Callable[[], T], timeout: float = 20) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s")
        time.sleep(0.02)


def all_finished(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(r["finished"] is not None for r in rows)
