"""Run jobs: find each one's handler, give it a context, enforce timeout and cancellation.

:class:`Runner` takes ready runs from the :class:`~.flow.Flow` as slots free up, runs each in a
task of its own and hands the run (now with its :class:`~.run.Outcome`) to the completer.

A handler's return value is the job's ``result`` (JSON, at most :data:`MAX_RESULT_BYTES`).
Whatever goes wrong becomes a failed outcome with ``{"error": message, "error_type": class
name}``; nothing a handler does (raise, return garbage, run too long) escapes into the worker.
Cancellation has several sources, told apart by :attr:`~.run.Run.stop`: the job's timeout
(``timed_out``), ``qdworker_cancel_job`` (``cancelled``), worker shutdown or a lease that could
not be renewed (``release``: the job goes back to pending), a claim known lost (``discard``).
A handler that raises while it is being released or discarded is released or discarded all
the same: the exception is the cancellation's echo, not the job's failure.

A plain-``def`` handler runs in a thread that cannot be interrupted: if it is still running
:data:`THREAD_GRACE_SECONDS` after its run was cancelled, :attr:`Runner.stuck` is set and the
worker replaces its process (the only way to stop that thread).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from .. import _registry as registry
from .. import _tracing as tracing
from .._logs import for_job, module_logger
from .._model import Job
from .._protocol import job_event
from .._schedule import cron
from ..errors import ClaimLostError
from .context import AsyncioJobContext, JobContext
from .figures import METER
from .flow import Flow
from .outbox import Outbox
from .run import Outcome, Run, error_result

logger = module_logger(__name__)

#: Largest result stored, as JSON; a larger one fails the job instead of bloating the table.
MAX_RESULT_BYTES: Final = 1024 * 1024
#: How long a cancelled plain-def handler's thread may go on before the process is replaced.
THREAD_GRACE_SECONDS: Final = 3.0

#: A NUL character as json.dumps writes it (an escaped backslash before "u0000" is not one).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _encode_result(value: Any) -> tuple[str, None] | tuple[None, dict[str, str]]:
    """``(json_text, None)`` if ``value`` can be stored, else ``(None, error result)``."""
    if value is None:
        return "null", None
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return None, error_result(f"result is not JSON-serialisable: {exc}", "InvalidResult")
    if len(text) > MAX_RESULT_BYTES:
        return None, error_result(
            f"result is {len(text)} bytes as JSON; the limit is {MAX_RESULT_BYTES}", "InvalidResult"
        )
    if _JSON_NUL.search(text):
        return None, error_result(
            "result contains a NUL character (\\u0000), which Postgres cannot store",
            "InvalidResult",
        )
    return text, None


async def _call(job_type: registry.JobType, ctx: JobContext, run: Run) -> Any:
    if job_type.runtime == "trio":
        return await job_type.handler(ctx)
    if job_type.runtime == "asyncio":
        import trio_asyncio

        return await trio_asyncio.aio_as_trio(job_type.handler)(AsyncioJobContext(ctx))
    done = threading.Event()
    run.thread_done = done

    def target() -> Any:
        run.thread = threading.current_thread()
        try:
            return job_type.handler(ctx)
        finally:
            done.set()

    return await trio.to_thread.run_sync(target, abandon_on_cancel=True)


def _refusal(job: Job) -> Outcome | registry.JobType:
    """The job's type, or the outcome of a job that cannot run (its handler is not called)."""
    if job.cron_schedule is not None and not cron.is_valid(job.cron_schedule):
        message = (
            f"invalid cron_schedule {job.cron_schedule!r}: expected 5 fields or 6 (seconds first)"
        )
        return Outcome("failed", error_result(message, "InvalidJob"), retry=False)
    job_type = registry.get(job.type)
    if job_type is None:
        return Outcome("failed", error_result(f"unknown job type '{job.type}'", "UnknownJobType"))
    return job_type


#: ``run_outcome`` of the endings that say it; the others say ``returned`` or ``raised``.
_RUN_OUTCOMES: Final = {
    "timed_out": "timed_out",
    "cancelled": "cancelled",
    "release": "preempted",
    "discard": "preempted",
}


def run_outcome(outcome: Outcome, raised: bool) -> str:
    """How the run ended, as the ``run_outcome`` column says it."""
    return _RUN_OUTCOMES.get(outcome.ending) or ("raised" if raised else "returned")


async def execute(run: Run, ctx: JobContext) -> Outcome:
    """Run ``run.job`` to an :class:`Outcome`, measured (``run.figures``, see
    :mod:`.figures`; left None when the handler is not called) and traced (the run's span,
    :mod:`qdworker._tracing`). Never raises (but trio.Cancelled from outside: the figures are
    kept without an outcome and the span ends without one)."""
    job_type = _refusal(run.job)
    if isinstance(job_type, Outcome):
        return job_type
    span = tracing.start_run(run.job)
    measure = METER.begin()
    ended: str | None = None
    try:
        if span is None:
            outcome, raised = await _handle(run, ctx, job_type)
        else:
            with span.current():
                outcome, raised = await _handle(run, ctx, job_type)
        ended = run_outcome(outcome, raised)
    finally:
        run.figures = METER.end(measure, ended)
        if span is not None:
            span.end(ended)
            run.figures.traceparent = span.traceparent
    return outcome


async def _handle(run: Run, ctx: JobContext, job_type: registry.JobType) -> tuple[Outcome, bool]:
    """Call the handler under its timeout; its outcome, and whether it raised."""
    timeout = run.job.timeout_seconds or job_type.timeout
    if timeout is not None:
        run.deadline = time.monotonic() + timeout
        run.scope.deadline = trio.current_time() + timeout
    try:
        with run.scope:
            value = await _call(job_type, ctx, run)
    except Exception as exc:
        if isinstance(exc, ClaimLostError):
            run.halt("lost", str(exc))
        stopped = run.stopped_outcome(committed=ctx.committed)
        if stopped is not None:
            return stopped, True
        if ctx.committed:
            ctx.log.exception("raised after its transaction committed the job")
            return Outcome("succeeded", committed=True), True
        ctx.log.info("failed: %s: %s", type(exc).__name__, exc)
        return Outcome("failed", error_result(str(exc) or repr(exc), type(exc).__name__)), True
    stopped = run.stopped_outcome(committed=ctx.committed)
    if stopped is not None:
        return stopped, False
    if run.scope.cancelled_caught and not ctx.committed:
        message = f"timed out after {timeout:g} s"
        return Outcome("timed_out", error_result(message, "JobTimeout")), False
    encoded, problem = _encode_result(value)
    if problem is not None:
        return Outcome("failed", problem, committed=ctx.committed), False
    return Outcome("succeeded", value, encoded=encoded, committed=ctx.committed), False


class Runner:
    """Starts ready runs of the :class:`~.flow.Flow` as slots free up; each run's outcome goes
    back to the flow (:meth:`~.flow.Flow.done`), for the completer.

    ``context(run)`` builds a handler's context. ``max_lost_runs``: a job whose runs were lost
    with their worker this often (when it has no ``max_attempts``) fails without running.
    :attr:`stuck` is set when a handler's thread ignores cancellation.
    """

    def __init__(
        self,
        flow: Flow,
        outbox: Outbox,
        context: Callable[[Run], JobContext],
        *,
        max_lost_runs: int,
    ) -> None:
        self._flow = flow
        self._outbox = outbox
        self._context = context
        self._max_lost_runs = max_lost_runs
        self.stuck = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run jobs until cancelled (cancelling running handlers: drain first)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                run = await self._flow.next_run()
                nursery.start_soon(self._run_one, run, name=f"job {run.job.id}")

    async def _run_one(self, run: Run) -> None:
        outcome = self._before_start(run)
        if outcome is None:
            ctx = self._context(run)
            if self._outbox.events_wanted:
                self._outbox.event(job_event("started", run.job))
            self._flow.tally.started(run.job)
            outcome = await execute(run, ctx)
            await ctx._end_progress()  # its last progress lands before its outcome
            if run.thread_running:
                self._watch_thread(run)
        self._flow.done(run, outcome)

    def _before_start(self, run: Run) -> Outcome | None:
        """The outcome of a run that must not start, or None."""
        stopped = run.stopped_outcome()
        if stopped is not None:
            return stopped
        job = run.job
        if not run.lost:
            return None
        limit = job.max_attempts if job.max_attempts is not None else self._max_lost_runs
        too_often = job.attempt > limit if job.max_attempts is not None else job.lost_runs > limit
        if too_often:
            reason = (
                f"the worker running this job was lost {job.lost_runs} time(s) "
                f"(crashed or killed); giving up after {limit} attempt(s)"
            )
            return Outcome("failed", error_result(reason, "WorkerLost"), retry=False)
        for_job(logger, job).warning(
            "job %d (%s): previous run was lost with its worker; running again (attempt %d)",
            job.id,
            job.type,
            job.attempt,
        )
        return None

    def _watch_thread(self, run: Run) -> None:
        async def watch() -> None:
            await trio.sleep(THREAD_GRACE_SECONDS)
            if run.thread_running:
                for_job(logger, run.job).error(
                    "job %d (%s): its handler thread ignores cancellation; replacing this "
                    "worker process",
                    run.job.id,
                    run.job.type,
                )
                self.stuck.set()

        assert self._nursery is not None
        self._nursery.start_soon(watch)
