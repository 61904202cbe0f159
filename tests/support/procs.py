"""Real worker and supervisor processes for tests, and bounded waits on database outcomes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from waiting import wait_until

__all__ = ["all_finished", "env_for", "running", "start_supervisor", "start_worker", "stop",
           "wait_for", "wait_until"]  # fmt: skip

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
            "QDWORKER_HTTP_PORT": "0",
            "WORKER_LOG_LEVEL": "info",
            "QDWORKER_POLL_INTERVAL": "5",
        }
    )
    env.update(settings)
    return env


def start_worker(db_url: str, **settings: str) -> subprocess.Popen[bytes]:
    """A bare worker child (no supervisor, no IPC)."""
    return subprocess.Popen(
        [sys.executable, "-m", "qdworker._worker"], env=env_for(db_url, **settings)
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
    """Run ``query`` until ``ready(rows)`` holds (see :func:`waiting.wait_until`)."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:

        def check() -> tuple[list[dict[str, Any]]] | None:  # a tuple: truthy even if rows=[]
            rows = conn.execute(query, params).fetchall()
            return (rows,) if ready(rows) else None

        return wait_until(check, timeout, what=repr(query))[0]


def all_finished(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(r["finished"] is not None for r in rows)
