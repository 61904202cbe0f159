"""The benchmark's processes: the supervisor under test, run as a subprocess, and the CPU
seconds and resident memory of processes, read from ``/proc`` (Linux only).

:class:`Supervisor` is ``python -m qdworker run`` with default settings except
``DATABASE_URL``, ``QDWORKER_JOBS`` (the no-op job type of :mod:`.jobs`), ``QDWORKER_WS_PORT=0``
and ``QDWORKER_HTTP_PORT=0`` (any free port: the defaults 8765 and 8766 may be taken) and
whatever the caller adds (``WORKER_COUNT`` for ``scaling``). Settings of the calling
environment (``QDWORKER_*``, ``WORKER_*``, ``LOG_*``, ``SOCKET_*``) are not passed on.

The ``/proc`` readers return ``None`` where ``/proc`` is missing or unreadable, so the benchmark
can say "not measured" instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import trio

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
STOP_TIMEOUT_S = 40.0  # SIGTERM, then SIGKILL to the supervisor's session after this long
WS_PORT_WAIT_S = 30.0  # how long to look for the websocket port in the supervisor's log
_WS_PORT_POLL_S = 0.05
_WS_RE = re.compile(r"websocket on [^\s:]+:(\d+)")
_JOBS_MODULE = "qdworker._benchmark.jobs"


class Supervisor:
    """``python -m qdworker run`` as a subprocess (own session), output to a log file."""

    def __init__(self, url: str, log_path: Path, **settings: str) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QDWORKER_", "WORKER_", "LOG_", "SOCKET_")) and k != "DATABASE_URL"
        }
        env.update(
            {
                "DATABASE_URL": url,
                "QDWORKER_JOBS": _JOBS_MODULE,
                "QDWORKER_WS_PORT": "0",
                "QDWORKER_HTTP_PORT": "0",
            }
        )
        env.update(settings)
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.launched = 0.0  # time.time() just before the launch

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            self.launched = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qdworker", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[int]:
        return descendants(self.pid)

    async def ws_port(self, limit_s: float = WS_PORT_WAIT_S) -> int | None:
        """The websocket server's port, from the supervisor's log (``None`` if not found)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            match = _WS_RE.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            await trio.sleep(_WS_PORT_POLL_S)
        return None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Stop gracefully (SIGTERM), kill after ``timeout_s``; the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (all its threads), seconds."""
    fields = _stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


def rss_bytes(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[21]) * _PAGE_BYTES


def parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[1])


def _all_parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return parents
    for name in names:
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None:
                parents[int(name)] = int(fields[1])
    return parents


def children_of(pid: int) -> list[int]:
    return [child for child, parent in _all_parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    parents = _all_parents()
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        kids = [child for child, parent in parents.items() if parent == current]
        found.extend(kids)
        todo.extend(kids)
    return found


def snapshot(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds by pid (processes that are gone are left out)."""
    out: dict[int, float] = {}
    for pid in pids:
        seconds = cpu_seconds(pid)
        if seconds is not None:
            out[pid] = seconds
    return out


def used(before: dict[int, float], after: dict[int, float], exclude: Iterable[int] = ()) -> float:
    """CPU seconds used between two snapshots by the processes alive at ``after`` (a process
    started in between counts from zero; one that ended in between is lost)."""
    skip = set(exclude)
    return sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid not in skip)
