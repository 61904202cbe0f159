"""A claimed job on its way through the worker (:class:`Run`), and how its run ended
(:class:`Outcome`).

A :class:`Run` is created by the claimer and carried forward: it waits in the ready queue, its
handler runs, its outcome is written by the completer; it holds the job's claim (fencing token
``job.claims``) the whole way, so the lease keeper renews it until the outcome is written.

Stopping a run has four causes, told apart by :attr:`Run.stop`: the job's cancellation
(``cancel``: finished as cancelled), worker shutdown (``release``: given back, pending again),
a lease that could not be renewed in time (``release`` too: the worker cannot prove it still
holds the claim) and a claim known lost (``lost``: another worker rescued the job; the outcome
is discarded).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import trio

from .._model import Job
from .._redact import redact

#: Longest error message stored.
MAX_ERROR_CHARS: Final = 2000

#: ``release`` gives the job back (pending again); ``discard`` writes nothing (the claim is
#: lost); the others finish it.
Ending = Literal["succeeded", "failed", "timed_out", "cancelled", "release", "discard"]
Stop = Literal["cancel", "release", "lost"]
State = Literal["queued", "running", "done"]


@dataclass(frozen=True, slots=True)
class Outcome:
    ending: Ending
    result: Any = None  # JSON-safe (checked by the runner)
    retry: bool = True  # False: never retried (invalid row, lost too often), even if configured
    encoded: str | None = None  # ``result`` as JSON, when the runner already encoded it
    committed: bool = False  # a handler's transaction already finished the job (ctx.transaction)

    @property
    def success(self) -> bool:
        return self.ending == "succeeded"


@dataclass(eq=False)
class Run:
    """One claimed job, from its claim until its outcome is written."""

    job: Job
    lost: bool = False  # the previous run was lost with its worker
    #: Monotonic time until which this worker may act on the claim: the last claim or lease
    #: renewal that covered it, plus most of a lease. Written by the lease keeper's thread.
    valid_until: float = field(default_factory=time.monotonic)
    state: State = "queued"
    stop: Stop | None = None
    reason: str = ""
    outcome: Outcome | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    deadline: float | None = None  # time.monotonic() of the job's timeout, read by a thread
    thread: threading.Thread | None = None  # a plain-def handler's thread
    thread_done: threading.Event | None = None
    run_ms: float | None = None  # how long the handler ran (None: it never started)

    @property
    def holds_claim(self) -> bool:
        return self.stop != "lost"

    def halt(self, stop: Stop, reason: str) -> None:
        """Stop the run for ``stop`` (see the module docstring). A cancellation is not turned
        into a release, nor a lost claim into anything else."""
        if self.stop == "lost" or (self.stop == "cancel" and stop == "release"):
            return
        self.stop = stop
        self.reason = reason
        self.scope.cancel()

    @property
    def thread_running(self) -> bool:
        return self.thread_done is not None and not self.thread_done.is_set()

    def stopped_outcome(self, *, committed: bool = False) -> Outcome | None:
        """The outcome of a run stopped from outside (None if it was not): a lost claim is
        discarded; a release or cancellation counts unless the handler's transaction already
        committed the job (``committed``)."""
        if self.stop == "lost":
            return Outcome("discard")
        if committed:
            return None
        if self.stop == "release":
            return Outcome("release")
        if self.stop == "cancel":
            message = f"Job cancelled: {self.reason}"
            return Outcome("cancelled", error_result(message, "JobCancelled"), retry=False)
        return None


def _storable_text(text: str) -> str:
    """``text`` without what Postgres cannot store in jsonb: NUL characters, lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_result(message: str, error_type: str) -> dict[str, str]:
    """A failed job's result: ``{"error": message, "error_type": error_type}``, the message
    without passwords, storable in jsonb and at most :data:`MAX_ERROR_CHARS` long."""
    text = _storable_text(redact(message))
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return {"error": text, "error_type": error_type}
