"""Run one job: find its handler, give it a context, enforce timeout and cancellation.

A handler's return value is the job's ``result`` (JSON, at most :data:`MAX_RESULT_BYTES`).
Whatever goes wrong becomes a failed :class:`~.outcome.Outcome` with
``{"error": message, "error_type": class name}``; nothing a handler does (raise, return
garbage, run too long) escapes into the worker. Cancellation has three sources, told apart:
the job's timeout (``timed_out``), ``qdworker_cancel_job`` (``cancelled``) and worker shutdown
(``release``: the job goes back to pending).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import registry
from ..db.connection import redact
from ..model import Job
from ..schedule import cron
from .context import AsyncioJobContext, JobContext
from .outcome import Outcome

__all__ = ["MAX_ERROR_CHARS", "MAX_RESULT_BYTES", "Run", "error_result", "run_job"]

logger = logging.getLogger("qdworker.job")

#: Largest result stored, as JSON; a larger one fails the job instead of bloating the table.
MAX_RESULT_BYTES = 1024 * 1024
#: Longest error message stored.
MAX_ERROR_CHARS = 2000


@dataclass(eq=False)
class Run:
    """A claimed job while it runs; the worker keeps them by job id."""

    job: Job
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    deadline: float | None = None  # time.monotonic(), read by the lease keeper's thread
    cancel_reason: str | None = None
    releasing: bool = False
    abandoned: bool = False  # given back at shutdown while its handler ignored cancellation
    thread: threading.Thread | None = None  # a plain-def handler's thread
    thread_done: threading.Event | None = None

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None and not self.releasing:
            self.cancel_reason = reason
        self.scope.cancel()

    def release(self) -> None:
        if self.cancel_reason is None:
            self.releasing = True
        self.scope.cancel()


#: A NUL character as json.dumps writes it (an escaped backslash before "u0000" is not one).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _storable_text(text: str) -> str:
    """``text`` without what Postgres cannot store in jsonb: NUL characters, lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_result(message: str, error_type: str) -> dict[str, str]:
    text = _storable_text(redact(message))
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return {"error": text, "error_type": error_type}


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


async def run_job(run: Run, ctx: JobContext, default_timeout: float | None = None) -> Outcome:
    """Run ``run.job`` to an :class:`Outcome`. Never raises (except trio.Cancelled from outside)."""
    job = run.job
    if job.cron_schedule is not None and not cron.is_valid(job.cron_schedule):
        message = (
            f"invalid cron_schedule {job.cron_schedule!r}: expected 5 fields or 6 (seconds first)"
        )
        return Outcome(job, "failed", error_result(message, "InvalidJob"), retry=False)
    job_type = registry.get(job.type)
    if job_type is None:
        return Outcome(
            job, "failed", error_result(f"unknown job type '{job.type}'", "UnknownJobType")
        )
    timeout = job.timeout_seconds or job_type.timeout or default_timeout
    if timeout is not None:
        run.deadline = time.monotonic() + timeout
        run.scope.deadline = trio.current_time() + timeout
    try:
        with run.scope:
            value = await _call(job_type, ctx, run)
    except Exception as exc:
        ctx.log.info("failed: %s: %s", type(exc).__name__, exc)
        return Outcome(job, "failed", error_result(str(exc) or repr(exc), type(exc).__name__))
    if run.scope.cancelled_caught or run.scope.cancel_called:
        if run.releasing:
            return Outcome(job, "release")
        if run.cancel_reason is not None:
            return Outcome(
                job,
                "cancelled",
                error_result(f"Job cancelled: {run.cancel_reason}", "JobCancelled"),
            )
        if run.scope.cancelled_caught:
            return Outcome(
                job, "timed_out", error_result(f"timed out after {timeout:g} s", "JobTimeout")
            )
    encoded, problem = _encode_result(value)
    if problem is not None:
        return Outcome(job, "failed", problem)
    return Outcome(job, "succeeded", value, encoded=encoded)
