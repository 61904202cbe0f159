"""Faults to inject into a running system, for real: no mocks.

* :func:`terminate_backends` ends qdworker's server connections (``pg_terminate_backend``), as a
  proxy, an idle timeout or an administrator would;
* :func:`pin_xmin` holds a snapshot open (a long transaction), so vacuum cannot remove dead
  rows while it lasts;
* :func:`drop_notifications` stops ``NOTIFY qdworker_jobs`` on inserts, so only the poll finds
  new jobs;
* :func:`kill_worker` kills a supervisor's worker process (SIGKILL by default).

Restarting, stopping, crashing and failing over the server itself is :class:`PostgresServer`;
a network that stops forwarding is :class:`TcpProxy`. Every function here opens its own
connection (autocommit, superuser rights expected, as on a test server) and closes it.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg


def terminate_backends(
    url: str, *, application_name: str = "qdworker-%", all_databases: bool = False
) -> int:
    """Terminate the server connections whose ``application_name`` matches the ``LIKE``
    pattern (default: all of qdworker's), on ``url``'s database unless ``all_databases``.
    Returns how many were terminated."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name LIKE %s AND pid <> pg_backend_pid()"
            " AND (%s OR datname = current_database())",
            (application_name, all_databases),
        ).fetchone()
    return int(row[0]) if row else 0


@contextmanager
def pin_xmin(url: str) -> Iterator[int]:
    """Hold a repeatable-read snapshot (and a transaction id) open for the ``with`` block, so
    the database's xmin horizon stands still and dead rows pile up. Yields the backend pid."""
    with psycopg.connect(url) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute("SELECT pg_current_xact_id(), pg_backend_pid()").fetchone()
        assert row is not None
        try:
            yield int(row[1])
        finally:
            conn.rollback()


@contextmanager
def drop_notifications(url: str) -> Iterator[None]:
    """Inserts send no ``NOTIFY qdworker_jobs`` during the ``with`` block (the insert
    trigger is disabled), as if every notification were lost."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE worker_jobs DISABLE TRIGGER worker_jobs_notify_insert")
        try:
            yield
        finally:
            conn.execute("ALTER TABLE worker_jobs ENABLE TRIGGER worker_jobs_notify_insert")


def worker_pids(supervisor_pid: int) -> list[int]:
    """The pids of a supervisor's worker processes (its direct children; Linux ``/proc``)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == supervisor_pid:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def kill_worker(
    supervisor_pid: int, *, sig: int = signal.SIGKILL, rng: random.Random | None = None
) -> int | None:
    """Send ``sig`` to one of the supervisor's worker processes, chosen at random; returns
    its pid (None if it has none right now)."""
    pids = worker_pids(supervisor_pid)
    if not pids:
        return None
    pid = (rng or random).choice(pids)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    return pid
