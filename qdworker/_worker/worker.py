"""One worker: the services of a worker process around its :class:`~.flow.Flow`.

::

    Listener (NOTIFY) ──wake──► Claimer ──► Flow.ready ──► Runner ──► Flow.finished ──► Completer
                                                 ▲                                      │
                                  LeaseKeeper ───┘ (renews what the flow holds)          ▼
                                                                                   Postgres

Stopping (first SIGTERM/SIGINT, or :meth:`Worker.request_stop`): the claimer stops between
two claims; queued runs are given back at once; running handlers get
``QDWORKER_SHUTDOWN_TIMEOUT`` seconds, then are cancelled and given back; the outcomes are
written; a last statement releases anything still leased to this worker (a claim in flight,
a handler that ignores cancellation is left to the supervisor, which releases it once the
process is gone) and marks the worker stopped. ``immediate`` (a second signal, SIGUSR1, or
the supervisor gone) skips the waiting.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any, Final

import trio

from .. import _config as config_module
from .. import _protocol as protocol
from .. import _registry as registry
from .._db import store
from .._db.connect import DbOptions
from .._db.connection import Link
from .._db.listen import Listener, Listening, Notification
from .._logs import for_job, module_logger
from ..errors import DatabaseError
from ._tally import resident_bytes
from .claimer import Claimer
from .completer import Completer
from .context import JobContext, JobDatabase
from .figures import METER
from .flow import Flow
from .leases import EXIT_STUCK, LeaseKeeper
from .outbox import Outbox
from .progress import ProgressWriter
from .run import Run
from .runner import Runner

logger = module_logger(__name__)

JOBS_CHANNEL: Final = "qdworker_jobs"
CANCEL_CHANNEL: Final = "qdworker_cancel"
QUEUES_CHANNEL: Final = "qdworker_queues"
HEARTBEAT_SECONDS: Final = 1.0
#: Seconds a released run may take to unwind after cancellation (e.g. an abandoned thread).
RELEASE_GRACE_SECONDS: Final = 1.0
#: Notifications waiting for the worker (the LISTEN connection pauses when it is full).
NOTIFICATION_BUFFER: Final = 1000
#: Bound on the last statement of a clean exit.
EXIT_STATEMENT_SECONDS: Final = 3.0


class Worker:
    """One worker process's services; see the module docstring. Owns its connections."""

    def __init__(
        self,
        cfg: config_module.Config,
        worker_id: str,
        url: str,
        outbox: Outbox,
        *,
        supervisor_id: str | None = None,
        slot: int | None = None,
        restarts: int = 0,
    ) -> None:
        self.cfg = cfg
        self.slot = slot
        self.restarts = restarts
        self.worker_id = worker_id
        self.url = url
        self.outbox = outbox
        self.supervisor_id = supervisor_id
        self.options = DbOptions(cfg.db_timeout)
        self.types = sorted(registry.registered())
        self.flow = Flow(cfg.concurrency)
        self.stopping = trio.Event()
        self.immediate = trio.Event()
        self.exit_code = 0
        self.db = JobDatabase(url, cfg.concurrency, self.options)
        self.claimer = Claimer(
            url,
            self.options,
            self.flow,
            owner=worker_id,
            types=self.types,
            queues=cfg.queues or None,
            lease_seconds=cfg.lease_seconds,
            poll_seconds=cfg.poll_interval,
            stopping=self.stopping,
        )
        self.completer = Completer(
            url,
            self.options,
            self.flow,
            outbox,
            timezone=cfg.timezone,
            clock_offset=lambda: self.claimer.clock_offset,
        )
        self.progress = ProgressWriter(url, self.options, outbox, worker_id)
        self.runner = Runner(self.flow, outbox, self._context, max_lost_runs=cfg.max_lost_runs)
        self.listener = Listener(url, (JOBS_CHANNEL, CANCEL_CHANNEL, QUEUES_CHANNEL), self.options)

    def _context(self, run: Run) -> JobContext:
        return JobContext(
            run,
            self.db,
            self.outbox,
            self.worker_id,
            self.completer.transaction_params,
            self.progress,
        )

    # -- control -----------------------------------------------------------------------------
    def cancel_run(self, job_id: int, reason: str = "cancelled by request") -> None:
        run = self.flow.held.get(job_id)
        if run is None or run.state == "done":
            return
        for_job(logger, run.job).info("job %d (%s): cancelling (%s)", job_id, run.job.type, reason)
        self.flow.halt(run, "cancel", reason)

    def request_stop(self, immediate: bool = False) -> None:
        self.stopping.set()
        self.flow.wake.set()
        if immediate:
            self.immediate.set()

    # -- services ----------------------------------------------------------------------------
    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async for signum in signals:
                immediate = self.stopping.is_set() or signum == signal.SIGUSR1
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

    async def _notifications(
        self, receive: trio.MemoryReceiveChannel[Notification | Listening]
    ) -> None:
        async for item in receive:
            if isinstance(item, Listening):
                if item.reconnected:
                    logger.debug("LISTEN is back: claiming what arrived meanwhile")
                self.claimer.queues_changed()
                self.flow.wake.set()
            elif item.channel == QUEUES_CHANNEL:
                self.claimer.queues_changed()
            elif item.channel == CANCEL_CHANNEL:
                self._cancel_notification(item.payload)
            else:
                if item.payload == "release":
                    self.claimer.release_heard()
                self.flow.wake.set()

    def _cancel_notification(self, payload: str) -> None:
        try:
            body = json.loads(payload)
            job_id, reason = int(body["id"]), str(body.get("reason") or "cancelled by request")
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed cancel notification %.200r", payload)
            return
        self.cancel_run(job_id, reason)

    def _beat(self) -> dict[str, Any]:
        return protocol.heartbeat(
            running=self.flow.running,
            completed=self.flow.completed,
            failed=self.flow.failed,
            claimed=self.claimer.claimed,
            tally=self.flow.tally.take(),
        )

    async def _heartbeat(self) -> None:
        while True:
            await self.outbox.send(self._beat())
            await trio.sleep(HEARTBEAT_SECONDS)

    def _report(self) -> dict[str, int | None]:
        """What the lease keeper's registration reports (called from its thread)."""
        completed, failed = self.flow.completed, self.flow.failed
        return {"slot": self.slot, "restarts": self.restarts, "rss_bytes": resident_bytes(),
                "jobs_run": completed + failed, "jobs_failed": failed}  # fmt: skip

    async def _exit_when_stuck(self, leases: LeaseKeeper) -> None:
        async with trio.open_nursery() as race:

            async def lease_lost() -> None:
                await leases.must_exit.wait()
                os._exit(leases.exit_code or 1)  # at once: the lease is ending

            async def thread_stuck() -> None:
                await self.runner.stuck.wait()
                self.exit_code = EXIT_STUCK
                self.request_stop(immediate=True)
                race.cancel_scope.cancel()

            race.start_soon(lease_lost)
            race.start_soon(thread_stuck)

    async def _claim(self, done: trio.Event) -> None:
        try:
            await self.claimer.run()
        finally:
            done.set()

    # -- shutdown ----------------------------------------------------------------------------
    async def _drain(self, claimer_done: trio.Event) -> list[int]:
        """Give everything back (see the module docstring); returns the ids of runs whose
        handlers would not stop."""
        with trio.move_on_after(self.options.client_deadline_seconds + 1):
            await claimer_done.wait()
        for run in list(self.flow.ready):
            self.flow.halt(run, "release", "the worker is stopping")
        await self._wait(self.flow.wait_none_running, self.cfg.shutdown_timeout)
        for run in self.flow.snapshot():
            if run.state == "running":
                self.flow.halt(run, "release", "the worker is stopping")
        with trio.move_on_after(RELEASE_GRACE_SECONDS):
            await self.flow.wait_none_running()
        abandoned = [run.job.id for run in self.flow.snapshot() if run.state == "running"]
        with trio.move_on_after(RELEASE_GRACE_SECONDS * 2):
            await self.flow.wait_all_written()
        return abandoned

    async def _wait(self, condition: Any, seconds: float) -> None:
        """``await condition()``, for at most ``seconds`` or until ``immediate``."""
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as race:

                async def done() -> None:
                    await condition()
                    race.cancel_scope.cancel()

                async def hurry() -> None:
                    await self.immediate.wait()
                    race.cancel_scope.cancel()

                race.start_soon(done)
                race.start_soon(hurry)

    async def _exit_statement(self, keep: list[int]) -> None:
        """Release whatever is still leased to this worker (bounded; failures are logged)."""
        link = Link(self.url, "exit", self.options, persistent=False)
        with trio.move_on_after(EXIT_STATEMENT_SECONDS) as scope:
            try:
                released = await link.run(
                    lambda raw: store.worker_exit(
                        raw, owner=self.worker_id, keep=keep, report=self._report()
                    )
                )
            except DatabaseError as exc:
                logger.warning("could not release this worker's jobs at exit: %s", exc)
            else:
                if released:
                    logger.info("released %d job(s) still leased to this worker", released)
            finally:
                await link.aclose()
        if scope.cancelled_caught:
            logger.warning("releasing this worker's jobs at exit timed out")

    async def run(self) -> int:
        """Run until stopped; return the exit status."""
        leases = LeaseKeeper(
            self.url,
            self.options,
            self.flow,
            owner=self.worker_id,
            supervisor=self.supervisor_id,
            types=self.types,
            lease_seconds=self.cfg.lease_seconds,
            report=self._report,
        )
        send, receive = trio.open_memory_channel[Notification | Listening](NOTIFICATION_BUFFER)
        async with trio.open_nursery() as services:
            await services.start(self.outbox.run)
            services.start_soon(self._signals)
            services.start_soon(self._supervisor_gone)
            await services.start(self.completer.run)
            await services.start(self.progress.run)
            await services.start(self.listener.run, send)
            services.start_soon(self._notifications, receive)
            leases.start()
            services.start_soon(leases.tick)
            services.start_soon(leases.guard)
            services.start_soon(self._exit_when_stuck, leases)
            services.start_soon(METER.sample_forever)
            async with _asyncio_loop_if_needed(), trio.open_nursery() as work:
                await work.start(self.runner.run)
                claimer_done = trio.Event()
                work.start_soon(self._claim, claimer_done)
                await self.outbox.send(protocol.worker_started(self.worker_id, os.getpid()))
                services.start_soon(self._heartbeat)
                logger.info(
                    "worker %s ready (concurrency %d, job types: %s)",
                    self.worker_id,
                    self.cfg.concurrency,
                    ", ".join(self.types),
                )
                await self.stopping.wait()
                abandoned = await self._drain(claimer_done)
                work.cancel_scope.cancel()
            leases.stop()
            await self._exit_statement(abandoned)
            with trio.move_on_after(1.0):
                await self.outbox.send(self._beat())  # the last counts
                await self.outbox.send(protocol.worker_shutdown(self.worker_id, self.exit_code))
            await self.db.aclose()
            services.cancel_scope.cancel()
        return self.exit_code


def _asyncio_loop_if_needed() -> AbstractAsyncContextManager[Any]:
    """A trio-asyncio loop for the worker's lifetime, if any job type needs one."""
    if any(t.runtime == "asyncio" for t in registry.registered().values()):
        import trio_asyncio

        return trio_asyncio.open_loop()  # type: ignore[no-any-return]
    return nullcontext()
