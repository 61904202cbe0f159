"""The job row as Python sees it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

JobStatus = Literal["pending", "running", "succeeded", "failed", "dead"]


@dataclass(frozen=True, slots=True)
class Job:
    """One ``worker_jobs`` row: every column as an attribute, ``data`` as a dict.

    ``attempt`` is the 1-based attempt number across the retry chain (a run lost with its
    worker counts as one). ``claims`` is the fencing token of the current run.
    ``on_tag_conflict`` is the tag rule it was inserted under: ``'replace'`` (it cancelled the
    pending job of its tag: QuickDapp's rule) or ``'keep'`` (inserted only if its tag had no
    pending or running job; its retries and cron ticks copy it but are never skipped).
    worker counts as one). ``claims`` is the fencing token of the current run. ``dead_at`` is
    when the run failed for good (failed, not cancelled, no retry or cron tick scheduled);
    ``None`` if it did not, or once it was redriven.

    The ``run_*`` attributes are the figures of the row's last run that ended (how,
    ``run_outcome``; wall and CPU time; peak memory of the worker process; its span), and
    ``lost_signal`` the signal that killed the worker in its last lost run; ``trace_context``
    is the submitter's W3C trace context. See README, "Run figures" and "Tracing".
    ``progress`` is the latest progress its handler reported (``ctx.progress``), or ``None``:
    see README, "Progress".

    ``depends_on`` names the jobs this one waits for (their retry chains); ``waiting_on`` is
    how many have not finished; ``on_parent_failure`` is ``'cancel'`` or ``'run'``;
    ``has_dependents`` says an unfinished job depends on this row. See README, "Dependencies
    and batches".
    """

    id: int
    tag: str
    type: str
    user_id: int
    data: dict[str, Any]
    due: datetime
    started: datetime | None
    finished: datetime | None
    remove_at: datetime
    success: bool | None
    result: Any
    cron_schedule: str | None
    auto_reschedule_on_failure: bool
    auto_reschedule_on_failure_delay: int
    remove_delay: int
    rescheduled_from_job: int | None
    persistent: bool
    created_at: datetime
    updated_at: datetime
    attempt: int
    max_attempts: int | None
    backoff: str
    timeout_seconds: float | None
    claims: int
    lost_runs: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    cancel_requested_at: datetime | None
    queue: str
    priority: int
    concurrency_key: str | None
    on_tag_conflict: str
    dead_at: datetime | None
    run_outcome: str | None
    run_wall_ms: float | None
    run_cpu_ms: float | None
    run_cpu_shared: bool | None
    run_peak_rss_bytes: int | None
    lost_signal: str | None
    trace_context: dict[str, Any] | None
    run_traceparent: str | None
    progress: dict[str, Any] | None = None
    depends_on: list[int] | None = None
    on_parent_failure: str = "cancel"
    waiting_on: int = 0
    has_dependents: bool = False

    @property
    def status(self) -> JobStatus:
        """``dead``: failed for good (see ``dead_at``); ``failed``: a failure that was retried,
        redriven or cancelled."""
        if self.finished is not None:
            if self.success:
                return "succeeded"
            return "dead" if self.dead_at is not None else "failed"
        return "pending" if self.started is None else "running"


@dataclasses.dataclass(frozen=True)
class Batch:
    """What ``submit_jobs(..., then=...)`` inserted: the batch's ``jobs`` (in the order given)
    and the ``then`` job, which depends on every one of them."""

    jobs: list[Job]
    then: Job


COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Job))

#: Columns a user may set when submitting a job (API and SQL).
USER_FIELDS: tuple[str, ...] = (
    "tag",
    "type",
    "user_id",
    "data",
    "due",
    "cron_schedule",
    "auto_reschedule_on_failure",
    "auto_reschedule_on_failure_delay",
    "remove_delay",
    "persistent",
    "max_attempts",
    "backoff",
    "timeout_seconds",
    "queue",
    "priority",
    "concurrency_key",
    "on_tag_conflict",
    "depends_on",
    "on_parent_failure",
)
