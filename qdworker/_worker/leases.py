"""Leases: renewal in a thread of its own, the guard that stops runs whose lease is in doubt,
and the stuck-handler watchdog.

**Renewal.** Every third of a lease (``QDWORKER_LEASE_SECONDS``) one statement (``heartbeat``)
registers the worker (``qdworker_workers``: id, types, pid …) and extends the lease of every
run it holds, fenced by ``(id, claims)``: a worker never renews a lease it did not take. A run
missing from the answer is no longer this worker's (another worker rescued it): it is stopped
at once and its outcome discarded. The thread has its own connection, so a handler that
blocks the trio loop cannot make a live worker lose its leases.

**What a run may rely on.** A claim or renewal sent at time *t* lets the worker act on the job
until ``t + 0.9 x lease`` (:attr:`~.run.Run.valid_until`); another worker may rescue it only
after ``t' + lease`` for some ``t' >= t`` (database clock). If renewals fail (database
unreachable), :meth:`LeaseKeeper.guard` stops a running handler shortly before its run's
``valid_until`` (its job is given back when the database returns, as at shutdown: not counted
as a failure nor as a lost run), and if the handler cannot be stopped (a plain-``def`` thread)
the process exits with :data:`EXIT_LEASE_LOST` before the moment: so a job never runs twice at
once, even when the worker is cut off from the database while the others are not.

One exception keeps jobs running through a database restart: when a reconnect attempt is
refused by the server itself (connection refused, socket gone, "starting up / shutting down";
single-host URLs only), the server is down for every worker, and when it comes back it will
not let any run be rescued for one lease (``qdworker_server_available_since``); the valid runs
are then extended to that attempt's start plus most of a lease.

**Watchdog.** If the trio loop has not ticked for :data:`LOOP_STALL_SECONDS` and a run is past
its timeout by :data:`STUCK_GRACE_SECONDS`, a handler is blocking the loop and ignoring its
timeout. The thread then fails those runs (timed out, fenced), releases the worker's other
runs, and ends the process with :data:`EXIT_STUCK`; the supervisor starts a new one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import psycopg
import trio

from .._db import statements, store
from .._db.connect import OUTAGE, Backoff, DbOptions, connect_sync, describe, server_is_down
from .._logs import for_job, module_logger
from ..errors import DatabaseError
from .claimer import VALID_FRACTION
from .flow import Flow
from .run import Run, error_result

logger = module_logger(__name__)

EXIT_STUCK: Final = 3
EXIT_LEASE_LOST: Final = 4
LOOP_STALL_SECONDS: Final = 2.0
STUCK_GRACE_SECONDS: Final = 3.0
#: How often the thread looks at the loop and the guard at the runs.
CHECK_SECONDS: Final = 0.25
#: A run whose lease could not be renewed is stopped this long (at most a quarter of a lease)
#: before it is no longer valid, so its handler has time to unwind.
PREEMPT_MAX_SECONDS: Final = 5.0

Raw = psycopg.Connection[Any]


class _Deadline:
    """Shut ``raw``'s socket down if the block takes longer than ``seconds`` (a black-holed
    network would otherwise block the thread for as long as TCP keeps trying)."""

    def __init__(self, raw: Raw, seconds: float) -> None:
        self._timer = threading.Timer(seconds, _shutdown, (raw,))
        self._timer.daemon = True

    def __enter__(self) -> None:
        self._timer.start()

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _shutdown(raw: Raw) -> None:
    try:
        with socket.socket(fileno=os.dup(raw.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error, ValueError):
        pass


def no_report() -> dict[str, int | None]:
    """What a worker without a supervisor reports with its heartbeat (no slot, no counts)."""
    return {"slot": None, "restarts": 0, "rss_bytes": None, "jobs_run": 0, "jobs_failed": 0}


class LeaseKeeper:
    """Owns a thread and its connection (:meth:`start` / :meth:`stop`) and two trio tasks
    (:meth:`tick`, :meth:`guard`); see the module docstring."""

    def __init__(
        self,
        url: str,
        options: DbOptions,
        flow: Flow,
        *,
        owner: str,
        supervisor: str | None,
        types: Sequence[str],
        lease_seconds: float,
        report: Callable[[], Mapping[str, int | None]] | None = None,
    ) -> None:
        self._url = url
        self._report = report or no_report  # called from the thread: must not block
        self._options = options
        self._flow = flow
        self._owner = owner
        self._supervisor = supervisor
        self._types = list(types)
        self._lease = lease_seconds
        self._stop = threading.Event()
        self._token = trio.lowlevel.current_trio_token()
        self.loop_tick = time.monotonic()
        #: Set when the process must end (a stuck thread would outlive its lease).
        self.exit_code: int | None = None
        self.must_exit = trio.Event()
        self._thread = threading.Thread(target=self._main, name="qdworker-leases", daemon=True)

    @property
    def _preempt_seconds(self) -> float:
        return min(PREEMPT_MAX_SECONDS, self._lease / 4)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- the trio side -----------------------------------------------------------------------
    async def tick(self) -> None:
        """Runs in the trio loop: proves it is alive."""
        while True:
            self.loop_tick = time.monotonic()
            await trio.sleep(CHECK_SECONDS)

    async def guard(self) -> None:
        """Stop runs whose lease is in doubt (see the module docstring)."""
        while True:
            now = time.monotonic()
            for run in self._flow.snapshot():
                if run.state == "done":
                    continue
                if run.stop is None and now >= run.valid_until - self._preempt_seconds:
                    for_job(logger, run.job).warning(
                        "job %d (%s): its lease could not be renewed in time (the database "
                        "is unreachable): stopping it; it runs again once the database is back",
                        run.job.id,
                        run.job.type,
                    )
                    self._flow.halt(run, "release", "its lease could not be renewed")
                if now >= run.valid_until and run.thread_running:
                    for_job(logger, run.job).error(
                        "job %d (%s): its handler thread ignores cancellation and its lease "
                        "is ending: replacing this worker process so it cannot run twice",
                        run.job.id,
                        run.job.type,
                    )
                    self.exit_code = EXIT_LEASE_LOST
                    self.must_exit.set()
            await trio.sleep(CHECK_SECONDS)

    def _renewed(self, held: list[Run], renewals: list[store.Renewal]) -> None:
        """In the trio thread: stop runs that are no longer ours; cancel requested ones."""
        kept = {r.job_id: r for r in renewals}
        for run in held:
            if run.state == "done" or self._flow.held.get(run.job.id) is not run:
                continue  # finished meanwhile: its outcome's fence decides
            renewal = kept.get(run.job.id)
            if renewal is None:
                reason = "another worker rescued the job (this run had lost its lease)"
                self._flow.halt(run, "lost", reason)
            elif renewal.cancel_requested:
                self._flow.halt(run, "cancel", "cancelled by request")

    # -- the thread --------------------------------------------------------------------------
    def _main(self) -> None:
        raw: Raw | None = None
        backoff = Backoff()
        next_renew = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if raw is None or raw.closed:
                    raw = self._connect()
                    next_renew = now
                if now >= next_renew:
                    self._heartbeat(raw)
                    next_renew = now + self._lease / 3
                    backoff.reset()
                self._watch(raw)
            except (DatabaseError, psycopg.Error, OSError) as exc:
                if not isinstance(exc, DatabaseError):  # a failed statement, not a connect
                    level = logging.DEBUG if raw is None or raw.closed else logging.WARNING
                    logger.log(level, "lease renewal failed: %s", describe(exc))
                if raw is not None:
                    raw.close()
                raw = None
                self._stop.wait(backoff.next())
                continue
            self._stop.wait(min(CHECK_SECONDS, max(0.0, next_renew - time.monotonic())))
        if raw is not None:
            raw.close()

    def _connect(self) -> Raw:
        attempt = time.monotonic()
        try:
            raw = connect_sync(self._url, "leases", self._options)
        except DatabaseError as exc:
            OUTAGE.failed(exc)
            if server_is_down(exc, self._url):
                self._extend(attempt + self._lease * VALID_FRACTION)
            raise
        OUTAGE.reached()
        return raw

    def _extend(self, until: float) -> None:
        """The server is down for everyone: runs still valid stay valid until ``until``."""
        now = time.monotonic()
        for run in self._flow.snapshot():
            if run.stop is None and now < run.valid_until < until:
                run.valid_until = until

    def _heartbeat(self, raw: Raw) -> None:
        # In id order, as the completer's batches: rows are locked in one order, no deadlock.
        held = sorted(
            (run for run in self._flow.snapshot() if run.holds_claim), key=lambda run: run.job.id
        )
        sent = time.monotonic()
        with _Deadline(raw, self._options.client_deadline_seconds):
            renewals = store.heartbeat(
                raw,
                owner=self._owner,
                supervisor=self._supervisor,
                host=socket.gethostname(),
                pid=os.getpid(),
                types=self._types,
                concurrency=self._flow.concurrency,
                lease_seconds=self._lease,
                runs=[(run.job.id, run.job.claims) for run in held],
                report=self._report(),
            )
        valid_until = sent + self._lease * VALID_FRACTION
        renewed = {r.job_id for r in renewals}
        for run in held:
            if run.job.id in renewed:
                run.valid_until = max(run.valid_until, valid_until)
        if len(renewed) < len(held) or any(r.cancel_requested for r in renewals):
            self._token.run_sync_soon(self._renewed, held, renewals)

    def _watch(self, raw: Raw) -> None:
        now = time.monotonic()
        if now - self.loop_tick < LOOP_STALL_SECONDS:
            return
        runs = [r for r in self._flow.snapshot() if r.state == "running"]
        stuck = [
            r for r in runs if r.deadline is not None and now > r.deadline + STUCK_GRACE_SECONDS
        ]
        if not stuck:
            return
        others = [r for r in self._flow.snapshot() if r not in stuck and r.holds_claim]
        for run in stuck:
            for_job(logger, run.job).error(
                "job %d (%s) ignores its timeout and blocks the worker: failing it and replacing "
                "this worker process",
                run.job.id,
                run.job.type,
            )
        timeout = json.dumps(
            error_result(
                "timed out and ignored cancellation; the worker process was replaced", "JobTimeout"
            )
        )
        with _Deadline(raw, self._options.client_deadline_seconds), raw.transaction():
            raw.execute(
                statements.get("complete"),
                {
                    "ids": [r.job.id for r in stuck],
                    "claims": [r.job.claims for r in stuck],
                    "success": [False for _ in stuck],
                    "results": [timeout for _ in stuck],
                },
            )
            if others:
                raw.execute(
                    statements.get("release"),
                    {"ids": [r.job.id for r in others], "claims": [r.job.claims for r in others]},
                )
        os._exit(EXIT_STUCK)
