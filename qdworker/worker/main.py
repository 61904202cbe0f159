"""The worker child process: ``python -m qdworker.worker`` (started by the supervisor).

It reads the same configuration as the supervisor (environment), its id from
``QDWORKER_WORKER_ID`` and its IPC socket from the fd in ``QDWORKER_IPC_FD``, imports the job
modules, and runs :class:`Worker` until told to stop:

* first SIGTERM/SIGINT: stop claiming; running jobs get ``QDWORKER_SHUTDOWN_TIMEOUT`` seconds,
  then they are cancelled and released (pending again at once); exit 0;
* second signal, SIGUSR1 (the supervisor's "hurry"), or the supervisor's end of the socket
  closing (it died): cancel and release at once; exit 0 within about a second;
* a handler that blocks the process past its timeout: exit :data:`~.leases.EXIT_STUCK`.

A start-up failure (bad job module, database unreachable) exits with status 2.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio

from .. import config as config_module
from .. import logs, registry
from ..db.connection import redact
from ..errors import QdworkerError
from ..model import Job
from ..supervisor import ipc
from .claimer import Claimed, Claimer
from .completer import Completer
from .context import JobContext, JobDatabase
from .leases import EXIT_STUCK, LeaseKeeper
from .listener import Listener
from .outbox import Outbox
from .outcome import Outcome, job_event
from .pacing import Pacer
from .runner import Run, error_result, run_job
from .wakeup import Wakeup

__all__ = ["EXIT_STARTUP", "Worker", "WorkerStatistics", "main"]

logger = logging.getLogger(__name__)

EXIT_STARTUP = 2
HEARTBEAT_SECONDS = 1.0
#: Seconds a released run may take to unwind after cancellation (e.g. an abandoned thread).
RELEASE_GRACE_SECONDS = 1.0
#: Outcomes waiting to be written before the claimer pauses (backpressure).
MAX_UNWRITTEN = 2000


@dataclass(frozen=True)
class WorkerStatistics:
    worker_id: str
    running: int
    completed: int
    failed: int
    claimed: int
    unwritten: int


class Worker:
    """One worker: owns its connections (claim, complete, listen, leases, job SQL) and runs."""

    def __init__(self, cfg: config_module.Config, worker_id: str, url: str, outbox: Outbox) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.url = url
        self.outbox = outbox
        self.runs: dict[int, Run] = {}  # running handlers
        self.queued: deque[Run] = deque()  # claimed, waiting for a free slot (see pacing)
        self.pacer = Pacer()
        self.wake = Wakeup()
        self.stop_claiming = trio.Event()
        self.immediate = trio.Event()
        self.exit_code = 0
        self._unwritten = 0
        self._completed = 0
        self._failed = 0
        self.db = JobDatabase(url, cfg.concurrency)
        self.completer = Completer(
            url, outbox, cfg.timezone, lambda: self.claimer.clock_offset, self._written
        )
        self.claimer = Claimer(
            url,
            worker_id,
            cfg.lease_seconds,
            cfg.poll_interval,
            self.wake,
            self._free,
            self._spawn,
            self.stop_claiming,
        )
        self.listener = Listener(url, self.wake, self.cancel_run)
        self._jobs: trio.Nursery | None = None

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            self.worker_id,
            len(self.runs),
            self._completed,
            self._failed,
            self.claimer.statistics().claimed,
            self._unwritten,
        )

    # -- slots -------------------------------------------------------------------------------
    def _free(self) -> int:
        """How many jobs to claim now: free slots plus room in the ready queue."""
        if self._unwritten >= MAX_UNWRITTEN:
            return 0
        room = self.cfg.concurrency - len(self.runs) + self.pacer.target - len(self.queued)
        if self.queued and room < (self.cfg.concurrency + self.pacer.target) // 4:
            return 0  # enough ready: wait to claim a worthwhile batch
        return max(0, room)

    def _written(self, outcome: Outcome) -> None:
        self._unwritten -= 1
        if outcome.ending == "succeeded":
            self._completed += 1
        elif outcome.ending != "release":
            self._failed += 1
        if self._unwritten == MAX_UNWRITTEN - 1 and (self.claimer.backlog or self.claimer.wanted):
            self.wake.set()

    def _finished(self, outcome: Outcome) -> None:
        del self.runs[outcome.job.id]
        self._unwritten += 1
        self.completer.submit(outcome)
        self.pacer.completed()
        self._dispatch()
        if self.claimer.backlog or self.claimer.wanted or self.stop_claiming.is_set():
            self.wake.set()

    def _dispatch(self) -> None:
        """Start ready jobs while slots are free."""
        while self.queued and len(self.runs) < self.cfg.concurrency:
            self._start(self.queued.popleft())
        if not self.queued:
            self.pacer.idle()

    def _start(self, run: Run) -> None:
        self.runs[run.job.id] = run
        assert self._jobs is not None
        self._jobs.start_soon(self._run_one, run, name=f"job {run.job.id}")

    def _spawn(self, claimed: Claimed) -> None:
        job = claimed.job
        if self.stop_claiming.is_set():  # claimed while stopping: give it straight back
            self._unwritten += 1
            self.completer.submit(Outcome(job, "release"))
            return
        if job.id in self.runs:  # cannot happen: the claim skips this worker's own leases
            logger.error("job %d (%s): claimed again while running here; ignored", job.id,
                         job.type, extra={"job_id": job.id, "job_type": job.type})  # fmt: skip
            return
        if claimed.lost and self._lost_too_often(job):
            limit = job.max_attempts if job.max_attempts is not None else self.cfg.max_lost_runs
            reason = (
                f"the worker running this job was lost {job.lost_runs} time(s) "
                f"(crashed or killed); giving up after {limit} attempt(s)"
            )
            self._unwritten += 1
            self.completer.submit(
                Outcome(job, "failed", error_result(reason, "WorkerLost"), retry=False)
            )
            return
        if claimed.lost:
            logger.warning(
                "job %d (%s): previous run was lost with its worker; running again (attempt %d)",
                job.id,
                job.type,
                job.attempt,
                extra={"job_id": job.id, "job_type": job.type},
            )
        self.queued.append(Run(job))
        self._dispatch()

    def _lost_too_often(self, job: Job) -> bool:
        if job.max_attempts is not None:
            return bool(job.attempt > job.max_attempts)
        return bool(job.lost_runs > self.cfg.max_lost_runs)

    async def _run_one(self, run: Run) -> None:
        job = run.job
        ctx = JobContext(job, self.db, self.outbox, self.worker_id)
        if self.outbox.events_wanted:
            self.outbox.event(job_event("started", job))
        outcome = await run_job(run, ctx)
        if run.abandoned:  # given back at shutdown while it ignored cancellation
            return
        if run.thread_done is not None and not run.thread_done.is_set():
            self._watch_abandoned_thread(run)
        self._finished(outcome)

    def _watch_abandoned_thread(self, run: Run) -> None:
        async def watch() -> None:
            await trio.sleep(RELEASE_GRACE_SECONDS * 3)
            if run.thread_done is not None and not run.thread_done.is_set():
                logger.error(
                    "job %d (%s): its handler thread ignores cancellation; replacing "
                    "this worker process",
                    run.job.id,
                    run.job.type,
                    extra={"job_id": run.job.id, "job_type": run.job.type},
                )
                self.exit_code = EXIT_STUCK
                self.stop_claiming.set()
                self.immediate.set()
                self.wake.set()

        assert self._jobs is not None
        self._jobs.start_soon(watch)

    # -- control -----------------------------------------------------------------------------
    def cancel_run(self, job_id: int, reason: str = "cancelled by request") -> None:
        for waiting in self.queued:
            if waiting.job.id == job_id:  # claimed but not started: finish it here
                self.queued.remove(waiting)
                message = f"Job cancelled: {reason}"
                self._unwritten += 1
                self.completer.submit(
                    Outcome(waiting.job, "cancelled", error_result(message, "JobCancelled"))
                )
                return
        run = self.runs.get(job_id)
        if run is not None:
            logger.info(
                "job %d (%s): cancelling (%s)",
                job_id,
                run.job.type,
                reason,
                extra={"job_id": job_id, "job_type": run.job.type},
            )
            run.cancel(reason)

    def request_stop(self, immediate: bool = False) -> None:
        self.stop_claiming.set()
        self.wake.set()
        if immediate:
            self.immediate.set()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async for signum in signals:
                immediate = self.stop_claiming.is_set() or signum == signal.SIGUSR1
                logger.info(
                    "%s: %s",
                    signal.Signals(signum).name,
                    "cancelling running jobs now" if immediate else "finishing running jobs",
                )
                self.request_stop(immediate)

    async def _supervisor_gone(self) -> None:
        await self.outbox.receive()
        logger.warning("the supervisor is gone: releasing jobs and exiting")
        self.request_stop(immediate=True)

    async def _heartbeat(self) -> None:
        while True:
            stats = self.statistics()
            await self.outbox.send(
                {
                    "kind": "heartbeat",
                    "running": stats.running,
                    "completed": stats.completed,
                    "failed": stats.failed,
                    "claimed": stats.claimed,
                }
            )
            await trio.sleep(HEARTBEAT_SECONDS)

    async def _drain(self) -> None:
        """After claiming stopped: give back what has not started, let runs finish, then
        release what is left."""
        while self.queued:
            self._unwritten += 1
            self.completer.submit(Outcome(self.queued.popleft().job, "release"))
        with trio.move_on_after(self.cfg.shutdown_timeout):
            async with trio.open_nursery() as race:

                async def until_empty() -> None:
                    while self.runs:
                        await self.wake.wait_until(math.inf)
                    race.cancel_scope.cancel()

                async def until_immediate() -> None:
                    await self.immediate.wait()
                    race.cancel_scope.cancel()

                race.start_soon(until_empty)
                race.start_soon(until_immediate)
        for run in list(self.runs.values()):
            run.release()
        with trio.move_on_after(RELEASE_GRACE_SECONDS):
            while self.runs:
                await self.wake.wait_until(math.inf)
        for run in list(self.runs.values()):  # handlers that ignore cancellation
            del self.runs[run.job.id]
            run.abandoned = True
            self._unwritten += 1
            self.completer.submit(Outcome(run.job, "release"))
        with trio.move_on_after(RELEASE_GRACE_SECONDS * 2):
            await self.completer.wait_idle()

    async def run(self) -> int:
        """Run until stopped; return the exit status."""
        keeper = LeaseKeeper(
            self.url,
            self.worker_id,
            self.cfg.lease_seconds,
            lambda: [*self.runs.values(), *self.queued],
            self.cancel_run,
        )
        async with trio.open_nursery() as services:
            await services.start(self.outbox.run)
            services.start_soon(self._signals)
            services.start_soon(self._supervisor_gone)
            await services.start(self.completer.run)
            await services.start(self.listener.run)
            keeper.start()
            services.start_soon(keeper.tick)
            maybe_asyncio = _asyncio_loop_if_needed()
            async with maybe_asyncio, trio.open_nursery() as jobs:
                self._jobs = jobs
                await jobs.start(self.claimer.run)
                await self.outbox.send(
                    {"kind": "worker-started", "worker_id": self.worker_id, "pid": os.getpid()}
                )
                services.start_soon(self._heartbeat)
                logger.info(
                    "worker %s ready (concurrency %d)", self.worker_id, self.cfg.concurrency
                )
                await self.stop_claiming.wait()
                await self._drain()
                jobs.cancel_scope.cancel()
            keeper.stop()
            with trio.move_on_after(1.0):
                await self.outbox.send(
                    {
                        "kind": "worker-shutdown",
                        "worker_id": self.worker_id,
                        "exit_code": self.exit_code,
                    }
                )
            await self.db.aclose()
            services.cancel_scope.cancel()
        return self.exit_code


class _NoLoop:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _asyncio_loop_if_needed() -> Any:
    """A trio-asyncio loop for the worker's lifetime, if any job type needs one."""
    if any(t.runtime == "asyncio" for t in registry.registered().values()):
        import trio_asyncio

        return trio_asyncio.open_loop()
    return _NoLoop()


def main() -> None:
    """Entry point of a worker child. Exits with the worker's status."""
    worker_id = os.environ.get("QDWORKER_WORKER_ID") or f"{socket.gethostname()}:{os.getpid()}"
    try:
        cfg = config_module.load()
    except QdworkerError as exc:
        print(f"qdworker worker: {exc}", file=sys.stderr)
        sys.exit(EXIT_STARTUP)
    logs.setup(cfg.worker_log_level, cfg.log_format, worker_id)
    if not cfg.database_url:
        logger.error("DATABASE_URL is not set (the supervisor passes it to its workers)")
        sys.exit(EXIT_STARTUP)
    try:
        from ..jobs import builtin  # noqa: F401  (registers the built-in job types)

        registry.import_modules(cfg.jobs)
    except QdworkerError as exc:  # e.g. a job module's own settings are invalid
        logger.error("cannot load job modules %s: %s", ",".join(cfg.jobs), exc)  # noqa: TRY400 (one line, no traceback)
        sys.exit(EXIT_STARTUP)
    except Exception:
        logger.exception("cannot import job modules %s", ",".join(cfg.jobs))
        sys.exit(EXIT_STARTUP)
    url = cfg.database_url

    async def open_and_run() -> int:
        # Without a supervisor (no IPC fd: tests, debugging) events go nowhere.
        with_ipc = ipc.DEFAULT_IPC_FD_ENV_VAR in os.environ
        outbox = Outbox(ipc.child_stream_from_env() if with_ipc else None)
        return await Worker(cfg, worker_id, url, outbox).run()

    try:
        code = trio.run(open_and_run)
    except Exception:
        logger.exception("worker %s failed (database %s)", worker_id, redact(cfg.database_url))
        code = EXIT_STARTUP
    sys.exit(code)
