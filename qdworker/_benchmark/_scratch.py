"""The scratch database every workload runs on, and the timings read back from it.

Every workload gets a fresh scratch database (``qdworker_bench``, migrated) on one server: the
embedded Postgres in a temporary data dir of its own, or the server of ``DATABASE_URL``.

Timings come from the database and the handler, never from polling: ``started`` (claim) and
``finished`` (completion commit) are the database's clock; the handler's start time is its
``result`` (``time.time()`` in the worker, see :mod:`.jobs`). Polling only tells when to read
them (:func:`wait_drained`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg.conninfo import make_conninfo

from .. import _devdb as devdb
from .._client import Queue
from .._db import connection, migrate
from .._db.connect import DbOptions
from . import procs
from .jobs import NOOP

SCRATCH_DB = "qdworker_bench"
WARMUP_JOBS = 5  # the first jobs of a warm session (ids 1..5), left out of its window
WARMUP_WAIT_S = 60.0
DRAIN_POLL_S = 0.05


class ScratchDatabase:
    """The server (embedded in a temporary data dir, or ``DATABASE_URL``'s) and the scratch
    database on it. Owns the temporary data dir and the embedded server it started."""

    def __init__(self, database_url: str | None) -> None:
        self._given = database_url
        self._server: devdb.EmbeddedServer | None = None
        self._tmp: Path | None = None
        self.server_url = ""
        self.url = ""
        self.postmaster: int | None = None
        self.description = ""
        self.version: str | None = None

    def start(self) -> None:
        if self._given:
            self.server_url = self._given
            self.description = "DATABASE_URL (scratch database qdworker_bench)"
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="qdworker-bench-"))
            self._server = devdb.start(self._tmp)
            self.server_url = self._server.url
            self.postmaster = self._server.pid
            self.description = "embedded Postgres (temporary data dir)"
        self.url = make_conninfo(self.server_url, dbname=SCRATCH_DB)
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), pg_backend_pid()"
            ).fetchone()
            assert row is not None
            self.version = str(row[0])
            if self.postmaster is None:
                # A local server: the postmaster is the parent of our backend.
                self.postmaster = procs.parent_of(int(row[1]))

    async def afresh(self) -> str:
        """Drop and recreate the scratch database, migrate it; its URL."""
        await trio.to_thread.run_sync(self._recreate)
        conn = await connection.connect(self.url, "bench", DbOptions(), statement_timeout=False)
        try:
            await migrate.apply(conn)
        finally:
            await conn.aclose()
        return self.url

    def _recreate(self) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {SCRATCH_DB}")

    def pg_pids(self) -> list[int]:
        """Every child of the postmaster: backends and background processes."""
        return procs.children_of(self.postmaster) if self.postmaster else []

    def close(self) -> None:
        try:
            with psycopg.connect(self.server_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")
        except psycopg.Error:
            pass
        if self._server is not None:
            devdb.stop(self._server)
            self._server = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


async def aquery(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    return await trio.to_thread.run_sync(query, url, sql, params)


def noop_jobs(n: int, **fields: Any) -> list[dict[str, Any]]:
    """``n`` no-op jobs with ``fields``; a ``concurrency_key`` of ``"k"`` spreads them over
    :data:`KEYS` keys."""
    keys = fields.pop("concurrency_key", None)
    jobs = [{"type": NOOP, **fields} for _ in range(n)]
    if keys is not None:
        for i, job in enumerate(jobs):
            job["concurrency_key"] = f"{keys}{i % KEYS}"
    return jobs


#: How many concurrency keys :func:`noop_jobs` spreads keyed jobs over.
KEYS = 100


async def submit_noops(url: str, n: int, **fields: Any) -> float:
    """One ``submit_jobs`` of ``n`` no-op jobs (with ``fields``); the seconds it took."""
    jobs = noop_jobs(n, **fields)
    async with Queue(url) as queue:
        t0 = time.perf_counter()
        await queue.submit_jobs(jobs)
        return time.perf_counter() - t0


async def warm_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    """:data:`WARMUP_JOBS` jobs through the supervisor, so the next ones meet a warm worker."""
    async with Queue(url) as queue:
        await queue.submit_jobs(noop_jobs(WARMUP_JOBS))
    await wait_drained(url, WARMUP_WAIT_S, proc)


async def wait_drained(url: str, limit_s: float, proc: subprocess.Popen[bytes]) -> float:
    """Wait until no bench job is unfinished; return ``time.time()`` when seen.

    Polls every :data:`DRAIN_POLL_S` on one connection (the partial claim index keeps the
    count cheap). Raises ``RuntimeError`` on timeout or if the supervisor exited."""
    deadline = time.monotonic() + limit_s

    def poll() -> float:
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                # EXISTS, not count(*): counting 20k unfinished rows every 50 ms costs the
                # server ~3 ms a time, measurably slowing the drain being measured.
                row = conn.execute(
                    "SELECT EXISTS (SELECT FROM worker_jobs WHERE finished IS NULL AND type = %s)",
                    (NOOP,),
                ).fetchone()
                if row is not None and not row[0]:
                    return time.time()
                if proc.poll() is not None:
                    raise RuntimeError(f"the supervisor exited with status {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jobs still unfinished after {limit_s:g} s")
                time.sleep(DRAIN_POLL_S)

    return await trio.to_thread.run_sync(poll, abandon_on_cancel=True)


@dataclass
class Window:
    """The bench jobs' times in the database (epoch seconds, the database's clock)."""

    count: int
    first_started: float  # min(started): the first claim
    last_finished: float  # max(finished): the last completion commit
    first_handler: float  # the earliest handler start (the jobs' results)
    reclaimed: int  # jobs claimed more than once
    failed: int

    @property
    def seconds(self) -> float:
        return self.last_finished - self.first_started

    def claim_notes(self) -> list[str]:
        return [f"{self.reclaimed} jobs claimed more than once"] if self.reclaimed else []


async def window(url: str, exclude_warmup: bool) -> Window:
    where = "type = %s" + (" AND id > %s" if exclude_warmup else "")
    params: tuple[Any, ...] = (NOOP, WARMUP_JOBS) if exclude_warmup else (NOOP,)
    rows = await aquery(
        url,
        "SELECT count(*), extract(epoch FROM min(started))::float8,"
        " extract(epoch FROM max(finished))::float8, min((result #>> '{}')::float8),"
        " count(*) FILTER (WHERE claims > 1), count(*) FILTER (WHERE NOT success)"
        f" FROM worker_jobs WHERE {where}",
        params,
    )
    return Window(*rows[0])


async def client_backend(url: str) -> int | None:
    """The pid of the backend of this process's :class:`~qdworker.Queue` (if exactly one)."""
    rows = await aquery(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = %s"
        " AND application_name = 'qdworker-client'",
        (SCRATCH_DB,),
    )
    return int(rows[0][0]) if len(rows) == 1 else None
