"""The benchmark's workloads: each one measures the current code at default settings.

Every workload gets a fresh scratch database (``qdworker_bench``, migrated) on one server: the
embedded Postgres in a temporary data dir of its own, or the server of ``DATABASE_URL``. The
supervisor runs as a subprocess, ``python -m qdworker`` with default settings except
``DATABASE_URL``, ``QDWORKER_JOBS`` (the no-op job type of :mod:`.jobs`), ``QDWORKER_WS_PORT=0``
(any free port: the default 8765 may be taken) and, for ``scaling``, ``WORKER_COUNT``.

Timings come from the database and the handler, never from polling: ``started`` (claim) and
``finished`` (completion commit) are the database's clock; the handler's start time is its
``result`` (``time.time()`` in the worker); the producer takes ``time.time()`` before the call
and right after ``submit_job`` returned (its commit). All clocks are the same machine's clock
when the database is local.

CPU is read from ``/proc``: worker processes (the supervisor's children), the supervisor, and
every child of the postmaster (backends and background writers) alive at the end of the window.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg.conninfo import make_conninfo

from ..client import Queue
from ..config import Config
from ..db import connection, embedded, migrate
from ..db.connect import DbOptions
from . import procs
from .jobs import NOOP

__all__ = ["ALL_WORKLOADS", "Bench", "Figure", "Options", "percentile"]

SCRATCH_DB = "qdworker_bench"
ALL_WORKLOADS = ("drain", "enqueue", "enqueue_batch", "wakeup", "steady", "scaling", "cost")
WARMUP_JOBS = 5
POLL_SECONDS = 0.05
_WS_RE = re.compile(r"websocket on [^\s:]+:(\d+)")


@dataclass
class Options:
    n: int = 20_000  # drain, enqueue_batch, cost, clients drain
    n_enqueue: int = 5_000  # enqueue (one call each)
    wakeup_n: int = 200
    wakeup_interval: float = 0.05
    steady_rate: float = 500.0
    steady_seconds: float = 20.0
    scaling: tuple[int, ...] = (1, 2, 4)
    clients: int = 0
    long: bool = False
    long_n: int = 100_000
    workloads: tuple[str, ...] = ALL_WORKLOADS
    database_url: str | None = None
    timeout: float = 300.0  # per wait for a queue to drain
    keep_logs: Path | None = None  # folder for supervisor logs (default: temporary)
    progress: Callable[[str], None] | None = None


@dataclass
class Figure:
    """One measured figure (one JSON line)."""

    workload: str
    n: int
    seconds: float | None
    jobs_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    loadavg: float | None = field(default_factory=lambda: _loadavg())

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "workload": self.workload,
            "n": self.n,
            "seconds": _round(self.seconds, 4),
            "jobs_per_s": _round(self.jobs_per_s, 1),
        }
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            value = getattr(self, key)
            if value is not None:
                out[key] = _round(value, 3)
        out["settings"] = self.settings
        out["loadavg_1m"] = self.loadavg
        out.update({k: v for k, v in self.extra.items()})
        if self.note:
            out["note"] = self.note
        return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (the peers benchmark's definition)."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def _ms_percentiles(seconds: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    values = [s * 1000 for s in seconds]
    return percentile(values, 50), percentile(values, 95), percentile(values, 99)


def _per_1k(value: float | None, n: int) -> float | None:
    return None if value is None or n <= 0 else round(value * 1000 / n, 4)


# --------------------------------------------------------------------------- database


class Database:
    """The server (embedded in a temporary data dir, or ``DATABASE_URL``'s) and the scratch
    database on it. Owns the temporary data dir and the embedded server it started."""

    def __init__(self, database_url: str | None) -> None:
        self._given = database_url
        self._server: embedded.EmbeddedServer | None = None
        self._tmp: Path | None = None
        self.server_url = ""
        self.url = ""
        self.postmaster: int | None = None
        self.description = ""

    def start(self) -> None:
        if self._given:
            self.server_url = self._given
            self.description = "DATABASE_URL (scratch database qdworker_bench)"
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="qdworker-bench-"))
            self._server = embedded.start(self._tmp)
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
        return procs.children_of(self.postmaster) if self.postmaster else []

    def close(self) -> None:
        try:
            with psycopg.connect(self.server_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")
        except psycopg.Error:
            pass
        if self._server is not None:
            embedded.stop(self._server)
            self._server = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


async def _aquery(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    return await trio.to_thread.run_sync(_query, url, sql, params)


async def _wait_drained(url: str, limit_s: float, proc: subprocess.Popen[bytes]) -> float:
    """Wait until no bench job is unfinished; return ``time.time()`` when seen.

    Polls every :data:`POLL_SECONDS` on one connection (the partial claim index keeps the count
    cheap). Raises ``RuntimeError`` on timeout or if the supervisor exited."""
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
                time.sleep(POLL_SECONDS)

    return await trio.to_thread.run_sync(poll, abandon_on_cancel=True)


# --------------------------------------------------------------------------- supervisor


class Supervisor:
    """``python -m qdworker`` as a subprocess (own session), output to a log file."""

    def __init__(self, url: str, log_path: Path, **settings: str) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QDWORKER_", "WORKER_", "LOG_", "SOCKET_")) and k != "DATABASE_URL"
        }
        env.update(
            {
                "DATABASE_URL": url,
                "QDWORKER_JOBS": "qdworker.benchmark.jobs",
                "QDWORKER_WS_PORT": "0",
            }
        )
        env.update(settings)
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.launched = 0.0

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
        return procs.descendants(self.pid)

    async def ws_port(self, limit_s: float = 30.0) -> int | None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            match = _WS_RE.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            await trio.sleep(0.05)
        return None

    def stop(self, timeout: float = 40.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode


# --------------------------------------------------------------------------- websocket clients


@dataclass
class _Client:
    messages: int = 0
    job_events: int = 0
    closed: str | None = None


async def _ws_client(port: int, client: _Client, ready: trio.Event | None) -> None:
    from trio_websocket import ConnectionClosed, open_websocket_url

    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
            while True:
                text = await ws.get_message()
                client.messages += 1
                if '"type": "job"' in text or '"type":"job"' in text:
                    client.job_events += 1
                elif ready is not None and not ready.is_set():
                    ready.set()
    except ConnectionClosed as exc:
        client.closed = f"closed {exc.reason.code if exc.reason else '?'}"
    except OSError as exc:
        client.closed = f"error {exc}"


# --------------------------------------------------------------------------- bench


class Bench:
    """Runs the selected workloads; :meth:`run` returns the figures in order."""

    def __init__(self, options: Options) -> None:
        self.o = options
        self.db = Database(options.database_url)
        self.figures: list[Figure] = []
        self._logs: Path | None = None
        self._tmp_logs: str | None = None
        self.defaults = Config()

    def _say(self, text: str) -> None:
        if self.o.progress is not None:
            self.o.progress(text)

    def settings(self, **changes: Any) -> dict[str, Any]:
        cfg = self.defaults.replace(**changes)
        return {
            "worker_count": cfg.worker_count,
            "concurrency": cfg.concurrency,
            "poll_interval_s": cfg.poll_interval,
            "lease_seconds": cfg.lease_seconds,
            "ws_enabled": cfg.ws_enabled,
            "log_level": cfg.log_level,
            "database": self.db.description,
            "postgres": getattr(self.db, "version", None),
        }

    def run(self) -> list[Figure]:
        self.db.start()
        if self.o.keep_logs is not None:
            self.o.keep_logs.mkdir(parents=True, exist_ok=True)
            self._logs = self.o.keep_logs
        else:
            self._tmp_logs = tempfile.mkdtemp(prefix="qdworker-bench-logs-")
            self._logs = Path(self._tmp_logs)
        try:
            trio.run(self._main)
        finally:
            self.db.close()
            if self._tmp_logs is not None:
                shutil.rmtree(self._tmp_logs, ignore_errors=True)
        return self.figures

    def _emit(self, figure: Figure) -> None:
        self.figures.append(figure)
        self._say(f"{figure.workload}: done")

    def _supervisor(self, name: str, **settings: str) -> Supervisor:
        assert self._logs is not None
        return Supervisor(self.db.url, self._logs / f"{name}.log", **settings)

    async def _main(self) -> None:
        w = set(self.o.workloads)
        drains: dict[int, Figure] = {}
        if "drain" in w or "scaling" in w:
            counts = [1] if "scaling" not in w else list(self.o.scaling)
            for count in counts:
                self._say(f"drain with {count} worker(s), N={self.o.n}")
                figure = await self.drain(self.o.n, count)
                drains[count] = figure
                if count == 1 and "drain" in w:
                    self._emit(figure)
            if "scaling" in w:
                for count in self.o.scaling:
                    base = drains[count]
                    self._emit(
                        Figure(
                            "scaling",
                            base.n,
                            base.seconds,
                            base.jobs_per_s,
                            settings=base.settings,
                            extra={"worker_count": count, "startup_s": base.extra.get("startup_s")},
                        )
                    )
        if "enqueue" in w:
            self._say(f"enqueue, {self.o.n_enqueue} single submit_job calls")
            self._emit(await self.enqueue_single(self.o.n_enqueue))
        if "enqueue_batch" in w:
            self._say(f"enqueue_batch, one submit_jobs call of {self.o.n}")
            self._emit(await self.enqueue_batch(self.o.n))
        if "wakeup" in w or "steady" in w:
            await self.idle_session("wakeup" in w, "steady" in w)
        if "cost" in w:
            self._say(
                f"cost: warm drain of {self.o.n}"
                + (f" then up to {self.o.long_n}" if self.o.long else "")
            )
            self._emit(await self.warm_drain("cost", self.o.n, clients=0, long=self.o.long))
        if self.o.clients:
            self._say(f"drain with {self.o.clients} websocket clients, N={self.o.n}")
            self._emit(await self.warm_drain("drain_clients", self.o.n, clients=self.o.clients))

    # -- helpers -------------------------------------------------------------------------------

    async def _bulk(self, url: str, n: int) -> float:
        jobs = [{"type": NOOP} for _ in range(n)]
        async with Queue(url) as queue:
            t0 = time.perf_counter()
            await queue.submit_jobs(jobs)
            return time.perf_counter() - t0

    async def _window(self, url: str, exclude_warmup: bool) -> dict[str, Any]:
        where = "type = %s" + (" AND id > %s" if exclude_warmup else "")
        params: tuple[Any, ...] = (NOOP, WARMUP_JOBS) if exclude_warmup else (NOOP,)
        rows = await _aquery(
            url,
            "SELECT count(*), extract(epoch FROM min(started))::float8,"
            " extract(epoch FROM max(finished))::float8, min((result #>> '{}')::float8),"
            " count(*) FILTER (WHERE claims > 1), count(*) FILTER (WHERE NOT success)"
            f" FROM worker_jobs WHERE {where}",
            params,
        )
        count, first, last, first_handler, reclaimed, failed = rows[0]
        return {
            "count": count,
            "first_started": first,
            "last_finished": last,
            "first_handler": first_handler,
            "reclaimed": reclaimed,
            "failed": failed,
        }

    async def _warm_up(self, url: str, sup: Supervisor) -> None:
        async with Queue(url) as queue:
            await queue.submit_jobs([{"type": NOOP} for _ in range(WARMUP_JOBS)])
        assert sup.proc is not None
        await _wait_drained(url, 60, sup.proc)

    # -- workloads -----------------------------------------------------------------------------

    async def drain(self, n: int, worker_count: int) -> Figure:
        url = await self.db.afresh()
        insert_s = await self._bulk(url, n)
        await _aquery(url, "ANALYZE worker_jobs")
        await _aquery(url, "CHECKPOINT")
        settings: dict[str, str] = {}
        if worker_count != self.defaults.worker_count:
            settings["WORKER_COUNT"] = str(worker_count)
        sup = self._supervisor(f"drain-{worker_count}", **settings)
        pg0 = procs.snapshot(self.db.pg_pids())
        proc = sup.start()
        try:
            seen = await _wait_drained(url, self.o.timeout, proc)
            workers = sup.workers()
            worker_cpu = sum(procs.snapshot(workers).values()) if workers else None
            pg_cpu = (
                procs.used(pg0, procs.snapshot(self.db.pg_pids())) if self.db.postmaster else None
            )
            sup_cpu = procs.cpu_seconds(sup.pid)
            rss = [procs.rss_bytes(pid) for pid in workers]
        finally:
            status = sup.stop()
        win = await self._window(url, exclude_warmup=False)
        seconds = win["last_finished"] - win["first_started"]
        note = []
        if win["reclaimed"]:
            note.append(f"{win['reclaimed']} jobs claimed more than once")
        if win["failed"]:
            note.append(f"{win['failed']} jobs failed")
        if status not in (0, None):
            note.append(f"supervisor exit status {status}")
        return Figure(
            "drain",
            n,
            seconds,
            n / seconds,
            settings=self.settings(worker_count=worker_count),
            extra={
                "startup_s": _round(win["first_started"] - sup.launched, 3),
                "first_handler_after_claim_ms": _round(
                    (win["first_handler"] - win["first_started"]) * 1000, 2
                ),
                "bulk_insert_s": _round(insert_s, 3),
                "seen_drained_after_last_finish_s": _round(seen - win["last_finished"], 3),
                "cpu_s": {
                    "workers_incl_startup": _round(worker_cpu, 2),
                    "supervisor_incl_startup": _round(sup_cpu, 2),
                    "postgres": _round(pg_cpu, 2),
                },
                "postgres_cpu_s_per_1k": _per_1k(pg_cpu, n),
                "worker_rss_mb": [_round(r / 2**20, 1) if r else None for r in rss],
                "timing": "DB min(started) -> max(finished); start-up = launch -> first claim",
            },
            note="; ".join(note),
        )

    async def enqueue_single(self, n: int) -> Figure:
        url = await self.db.afresh()
        async with Queue(url) as queue:
            pid = await self._client_backend(url)
            pg0 = procs.snapshot(self.db.pg_pids())
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            for i in range(n):
                await queue.submit_job(type=NOOP, data={"i": i})
            seconds = time.perf_counter() - t0
            client_cpu = time.process_time() - cpu0
            pg1 = procs.snapshot(self.db.pg_pids())
        pg_backend = (pg1.get(pid, 0.0) - pg0.get(pid, 0.0)) if pid in pg1 else None
        pg_all = procs.used(pg0, pg1) if self.db.postmaster else None
        return Figure(
            "enqueue",
            n,
            seconds,
            n / seconds,
            settings=self.settings(),
            extra={
                "api": "Queue.submit_job, one call (= one transaction) each, sequential",
                "cpu_ms_per_job": {
                    "client_process": _round(client_cpu * 1000 / n, 3),
                    "postgres_backend": _round(pg_backend * 1000 / n, 3)
                    if pg_backend is not None
                    else None,
                    "postgres_all": _round(pg_all * 1000 / n, 3) if pg_all is not None else None,
                },
            },
        )

    async def _client_backend(self, url: str) -> int | None:
        rows = await _aquery(
            url,
            "SELECT pid FROM pg_stat_activity WHERE datname = %s"
            " AND application_name = 'qdworker-client'",
            (SCRATCH_DB,),
        )
        return int(rows[0][0]) if len(rows) == 1 else None

    async def enqueue_batch(self, n: int) -> Figure:
        url = await self.db.afresh()
        jobs = [{"type": NOOP, "data": {"i": i}} for i in range(n)]
        async with Queue(url) as queue:
            t0 = time.perf_counter()
            await queue.submit_jobs(jobs)
            seconds = time.perf_counter() - t0
        return Figure(
            "enqueue_batch",
            n,
            seconds,
            n / seconds,
            settings=self.settings(),
            extra={"api": "Queue.submit_jobs, one call (one INSERT ... jsonb_to_recordset)"},
        )

    async def idle_session(self, wakeup: bool, steady: bool) -> None:
        url = await self.db.afresh()
        sup = self._supervisor("idle")
        proc = sup.start()
        try:
            await self._warm_up(url, sup)
            if wakeup:
                self._say(
                    f"wakeup: {self.o.wakeup_n} single inserts "
                    f"{self.o.wakeup_interval * 1000:g} ms apart"
                )
                await trio.sleep(1.0)
                self._emit(
                    await self._paced(
                        url, proc, "wakeup", self.o.wakeup_n, 1 / self.o.wakeup_interval
                    )
                )
            if steady:
                n = int(self.o.steady_rate * self.o.steady_seconds)
                self._say(f"steady: {self.o.steady_rate:g}/s for {self.o.steady_seconds:g} s")
                await trio.sleep(1.0)
                self._emit(await self._paced(url, proc, "steady", n, self.o.steady_rate))
        finally:
            sup.stop()

    async def _paced(
        self, url: str, proc: subprocess.Popen[bytes], workload: str, n: int, rate: float
    ) -> Figure:
        sent: dict[int, tuple[float, float]] = {}
        lag_max = 0.0
        async with Queue(url) as queue:
            start = time.monotonic() + 0.01
            for i in range(n):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await trio.sleep(delay)
                else:
                    lag_max = max(lag_max, -delay)
                before = time.time()
                job = await queue.submit_job(type=NOOP, data={"i": i})
                sent[job.id] = (before, time.time())
            produce_s = time.monotonic() - start
        await _wait_drained(url, self.o.timeout, proc)
        rows = await _aquery(
            url,
            "SELECT id, (result #>> '{}')::float8, extract(epoch FROM finished)::float8,"
            " extract(epoch FROM started)::float8 FROM worker_jobs WHERE id = ANY(%s)",
            (list(sent),),
        )
        from_commit = [h - sent[i][1] for i, h, _, _ in rows if h is not None]
        from_call = [h - sent[i][0] for i, h, _, _ in rows if h is not None]
        # Split of the wake-up path: commit -> claim statement start (NOTIFY, wake, thread hop)
        # and claim statement start -> handler start (claim, next_wakeup, row -> Job, spawn).
        to_claim = [st - sent[i][1] for i, h, _, st in rows if h is not None]
        claim_to_handler = [h - st for _, h, _, st in rows if h is not None]
        last_finished = max(f for _, _, f, _ in rows)
        first_call = min(b for b, _ in sent.values())
        p50, p95, p99 = _ms_percentiles(from_commit)
        c50, c95, c99 = _ms_percentiles(from_call)
        if workload == "wakeup":
            seconds = produce_s
            jobs_per_s = None
        else:
            seconds = last_finished - first_call
            jobs_per_s = len(rows) / seconds
        return Figure(
            workload,
            n,
            seconds,
            jobs_per_s,
            p50,
            p95,
            p99,
            settings=self.settings(),
            extra={
                "latency": "handler start - submit_job returned (commit); "
                "*_from_call: - before the call",
                "p50_ms_from_call": _round(c50, 3),
                "p95_ms_from_call": _round(c95, 3),
                "p99_ms_from_call": _round(c99, 3),
                "max_ms": _round(max(from_commit) * 1000, 3) if from_commit else None,
                "commit_to_claim_ms_p50_p95": [_round(v, 3) for v in _ms_percentiles(to_claim)[:2]],
                "claim_to_handler_ms_p50_p95": [
                    _round(v, 3) for v in _ms_percentiles(claim_to_handler)[:2]
                ],
                "rate_asked": rate,
                "rate_achieved": _round(n / produce_s, 1),
                "producer_max_lag_s": _round(lag_max, 4),
            },
        )

    async def warm_drain(
        self, workload: str, n: int, *, clients: int, long: bool = False
    ) -> Figure:
        url = await self.db.afresh()
        settings: dict[str, str] = {}
        sup = self._supervisor(workload, **settings)
        sup.start()
        state: list[_Client] = []
        note: list[str] = []
        try:
            await self._warm_up(url, sup)
            async with trio.open_nursery() as nursery:
                if clients:
                    port = await sup.ws_port()
                    if port is None:
                        note.append(
                            "websocket server not found in the supervisor's log: no clients"
                        )
                    else:
                        for _ in range(clients):
                            client = _Client()
                            state.append(client)
                            ready = trio.Event()
                            nursery.start_soon(_ws_client, port, client, ready)
                            with trio.move_on_after(10):
                                await ready.wait()
                await trio.sleep(0.5)
                figure = await self._measured_drain(workload, url, sup, n, long)
                nursery.cancel_scope.cancel()
        finally:
            status = sup.stop()
        if state:
            figure.extra["clients"] = {
                "connected": len(state),
                "job_events_received": [c.job_events for c in state],
                "closed": [c.closed for c in state if c.closed],
            }
        if status not in (0, None):
            note.append(f"supervisor exit status {status}")
        if note:
            figure.note = "; ".join(filter(None, [figure.note, *note]))
        return figure

    async def _measured_drain(
        self, workload: str, url: str, sup: Supervisor, n: int, long: bool
    ) -> Figure:
        assert sup.proc is not None
        workers = sup.workers()
        rss0 = {pid: procs.rss_bytes(pid) for pid in workers}
        w0 = procs.snapshot(workers)
        s0 = procs.cpu_seconds(sup.pid)
        async with Queue(url) as queue:
            producer = await self._client_backend(url)
            pg0 = procs.snapshot(self.db.pg_pids())
            t0 = time.perf_counter()
            await queue.submit_jobs([{"type": NOOP} for _ in range(n)])
            insert_s = time.perf_counter() - t0
            # The producer's backend ends with its connection: read its CPU now.
            pg_insert = None
            if producer is not None and producer in pg0:
                after = procs.cpu_seconds(producer)
                pg_insert = None if after is None else after - pg0[producer]
        await _wait_drained(url, self.o.timeout, sup.proc)
        w1 = procs.snapshot(workers)
        s1 = procs.cpu_seconds(sup.pid)
        pg1 = procs.snapshot(self.db.pg_pids())
        rss1 = {pid: procs.rss_bytes(pid) for pid in workers}
        win = await self._window(url, exclude_warmup=True)
        seconds = win["last_finished"] - win["first_started"]
        worker_cpu = procs.used(w0, w1)
        pg_worker_side = (
            procs.used(pg0, pg1, exclude=[producer] if producer else [])
            if self.db.postmaster
            else None
        )
        sup_cpu = (s1 - s0) if s0 is not None and s1 is not None else None
        extra: dict[str, Any] = {
            "timing": "idle supervisor (warmed up); one submit_jobs of N; "
            "DB min(started) -> max(finished)",
            "bulk_insert_s": _round(insert_s, 3),
            "cpu_s_per_1k": {
                "workers": _per_1k(worker_cpu, n),
                "supervisor": _per_1k(sup_cpu, n),
                "postgres_drain": _per_1k(pg_worker_side, n),
                "postgres_insert": _per_1k(pg_insert, n),
            },
            "worker_rss_mb_before": [_round(r / 2**20, 1) if r else None for r in rss0.values()],
            "worker_rss_mb_after": [_round(r / 2**20, 1) if r else None for r in rss1.values()],
        }
        figure = Figure(workload, n, seconds, n / seconds, settings=self.settings(), extra=extra)
        if win["reclaimed"]:
            figure.note = f"{win['reclaimed']} jobs claimed more than once"
        if long:
            done = n
            samples = []
            async with Queue(url) as queue:
                while done < self.o.long_n:
                    batch = min(10_000, self.o.long_n - done)
                    await queue.submit_jobs([{"type": NOOP} for _ in range(batch)])
                    await _wait_drained(url, self.o.timeout, sup.proc)
                    done += batch
                    samples.append(
                        round(sum((procs.rss_bytes(p) or 0) for p in workers) / 2**20, 1)
                    )
                    await _aquery(url, "DELETE FROM worker_jobs WHERE finished IS NOT NULL")
            first = samples[0] if samples else None
            extra["long"] = {
                "jobs": done,
                "worker_rss_mb_per_10k": samples,
                "growth_mb_after_first_10k": _round(samples[-1] - first, 1) if first else None,
            }
        return figure


def render_table(figures: Sequence[Figure]) -> str:
    """A fixed-width table of the figures (the human-readable output)."""
    head = ("workload", "n", "seconds", "jobs/s", "p50 ms", "p95 ms", "p99 ms", "notes")
    rows = [head]

    def f(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:,.{digits}f}"

    for fig in figures:
        notes = []
        x = fig.extra
        if fig.workload == "drain":
            notes.append(f"start-up {x.get('startup_s')} s")
            notes.append(f"PG CPU {_ms(x.get('postgres_cpu_s_per_1k'))} ms/1k (incl. start-up)")
        elif fig.workload == "scaling":
            notes.append(f"WORKER_COUNT={x.get('worker_count')}, start-up {x.get('startup_s')} s")
        elif fig.workload in ("wakeup", "steady"):
            notes.append(
                f"from call p50/p95 {x.get('p50_ms_from_call')}/{x.get('p95_ms_from_call')} ms"
            )
            if fig.workload == "steady":
                notes.append(f"enqueued {x.get('rate_achieved')}/s")
        elif fig.workload in ("cost", "drain_clients"):
            cpu = x.get("cpu_s_per_1k", {})
            notes.append(
                f"CPU ms/1k: workers {_ms(cpu.get('workers'))}, supervisor "
                f"{_ms(cpu.get('supervisor'))}, PG {_ms(cpu.get('postgres_drain'))} "
                f"(+{_ms(cpu.get('postgres_insert'))} insert)"
            )
            notes.append(
                f"RSS MB {x.get('worker_rss_mb_before')} -> {x.get('worker_rss_mb_after')}"
            )
            if "long" in x:
                notes.append(
                    f"long: {x['long']['jobs']} jobs, RSS growth "
                    f"{x['long']['growth_mb_after_first_10k']} MB"
                )
            if "clients" in x:
                c = x["clients"]
                notes.append(
                    f"{c['connected']} clients, events {min(c['job_events_received'] or [0])}"
                    f"-{max(c['job_events_received'] or [0])}, closed {len(c['closed'])}"
                )
        elif fig.workload == "enqueue":
            cpu = x.get("cpu_ms_per_job", {})
            notes.append(
                f"CPU ms/job: client {cpu.get('client_process')}, PG {cpu.get('postgres_backend')}"
            )
        if fig.note:
            notes.append(fig.note)
        rows.append(
            (
                fig.workload,
                str(fig.n),
                f(fig.seconds, 3),
                f(fig.jobs_per_s, 0),
                f(fig.p50_ms, 2),
                f(fig.p95_ms, 2),
                f(fig.p99_ms, 2),
                "; ".join(notes),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(widths))]
        lines.append("  ".join(cells) + "  " + r[-1])
    return "\n".join(lines)


def _ms(seconds_per_1k: float | None) -> str:
    return "-" if seconds_per_1k is None else f"{seconds_per_1k * 1000:.0f}"


def dumps(figure: Figure) -> str:
    return json.dumps(figure.as_json(), sort_keys=False)
