"""Write outcomes in batches: finish rows (fenced), insert retry and cron successors.

Outcomes queue up while a batch is being written, so the batch size follows the load: one
job alone is written at once, thousands per second share a few statements. Each batch is one
statement (``finish``, one round trip, atomic) on the completer's own connection: it finishes
rows fenced by ``claims`` (a run whose lease was lost is rejected and counted), inserts the
successors of the rows it finished, and gives back released runs.

Retry rule (QuickDapp, fixed): a failure with ``auto_reschedule_on_failure`` gets a new row
after ``auto_reschedule_on_failure_delay`` ms (or exponential backoff), copying every user
field including ``persistent``, until ``max_attempts``; a cron job always gets its next tick (a
failure is retried first if the retry comes before the tick). A cancelled job gets no
successor.

A batch that fails with a transient database error is retried on a new connection; the rows
stay leased (and renewed) meanwhile, so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import trio

from ..db import statements
from ..db.connection import Connection, connect, is_transient
from ..schedule import backoff, cron
from .outbox import Outbox
from .outcome import Outcome, job_event
from .runner import error_result

__all__ = ["Completer", "CompleterStatistics"]

logger = logging.getLogger(__name__)

#: Most outcomes written in one transaction.
MAX_BATCH = 1000
RETRY_MIN_SECONDS = 0.05
RETRY_MAX_SECONDS = 5.0


@dataclass(frozen=True)
class CompleterStatistics:
    written: int
    rejected: int  # stale runs refused by the fence
    released: int
    successors: int
    batches: int
    pending: int


def _unstorable(exc: Exception) -> dict[str, str]:
    sqlstate = getattr(exc, "sqlstate", None) or "?"
    message = f"the outcome could not be stored (SQLSTATE {sqlstate})"
    return error_result(message, "UnstorableOutcome")


def _int_array(values: Iterable[int]) -> str:
    """A Postgres array literal: far cheaper to build than psycopg's list adaptation."""
    return "{" + ",".join(map(str, values)) + "}"


@dataclass(frozen=True)
class _Successor:
    from_id: int
    due: datetime | None
    delay_ms: float | None
    attempt: int
    kind: str  # "retry" | "cron"


class Completer:
    """Owns its connection. ``submit()`` never blocks; ``on_done(outcome)`` is called (trio
    thread) after an outcome is durably written or rejected, to free its slot."""

    def __init__(
        self,
        url: str,
        outbox: Outbox,
        timezone: str,
        clock_offset: Callable[[], float],
        on_done: Callable[[Outcome], None],
    ) -> None:
        self._url = url
        self._outbox = outbox
        self._timezone = timezone
        self._clock_offset = clock_offset
        self._on_done = on_done
        self._pending: list[Outcome] = []
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._conn: Connection | None = None
        self._written = self._rejected = self._released = self._successors = self._batches = 0

    def submit(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    def statistics(self) -> CompleterStatistics:
        return CompleterStatistics(
            self._written,
            self._rejected,
            self._released,
            self._successors,
            self._batches,
            len(self._pending),
        )

    async def wait_idle(self) -> None:
        """Return once every submitted outcome has been written."""
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._conn = await connect(self._url, application_name="qdworker-complete")
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pending:
                    batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                    await self._write_with_retry(batch)
                self._idle.set()
        finally:
            with trio.CancelScope(shield=True):
                await self._conn.aclose()

    async def _write_with_retry(self, batch: list[Outcome]) -> None:
        """Write ``batch``; retry transient failures (reconnecting) until it is written.

        A failure that is not transient means Postgres refuses a value in the batch (a result
        with a NUL character, a retry delay out of range …): the batch is split until the
        offending outcome is alone, which is then stored as a plain failure saying why, so
        one bad result never blocks the others.
        """
        delay = RETRY_MIN_SECONDS
        while True:
            try:
                await self._write(batch)
                return
            except Exception as exc:
                if not is_transient(exc) and not (self._conn is None or self._conn.closed):
                    await self._write_refused(batch, exc)
                    return
                logger.warning("writing job outcomes failed (%s); retrying", exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
            if self._conn is None or self._conn.closed:
                try:
                    self._conn = await connect(self._url, application_name="qdworker-complete")
                except Exception as exc:
                    logger.warning("reconnect failed: %s", exc)

    async def _write_refused(self, batch: list[Outcome], exc: Exception) -> None:
        if len(batch) > 1:
            middle = len(batch) // 2
            await self._write_with_retry(batch[:middle])
            await self._write_with_retry(batch[middle:])
            return
        [outcome] = batch
        job = outcome.job
        if outcome.result == _unstorable(exc) or outcome.ending == "release":
            # Even the plain failure was refused: leave the row to its lease (it is rescued).
            logger.error("job %d (%s): its outcome cannot be stored (%s); leaving it to its "
                         "lease", job.id, job.type, exc,
                         extra={"job_id": job.id, "job_type": job.type})  # fmt: skip
            self._on_done(outcome)
            return
        logger.error("job %d (%s): its outcome was refused by the database (%s); storing it "
                     "as a failure", job.id, job.type, exc,
                     extra={"job_id": job.id, "job_type": job.type})  # fmt: skip
        await self._write_with_retry([Outcome(job, "failed", _unstorable(exc), retry=False)])

    def _db_now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self._clock_offset(), UTC)

    def _successor(self, outcome: Outcome, now: datetime) -> _Successor | None:
        job = outcome.job
        if outcome.ending == "cancelled":
            return None
        tick: datetime | None = None
        if job.cron_schedule:
            try:
                tick = cron.next_tick(job.cron_schedule, job.due, now, self._timezone)
            except ValueError:
                tick = None  # the run itself failed with the reason (see runner)
        if (
            not outcome.success
            and outcome.retry
            and job.auto_reschedule_on_failure
            and backoff.attempts_left(job.attempt, job.max_attempts)
        ):
            delay = backoff.retry_delay_ms(
                job.backoff, job.auto_reschedule_on_failure_delay, job.attempt
            )
            if tick is None or now + timedelta(milliseconds=delay) < tick:
                return _Successor(job.id, None, float(delay), job.attempt + 1, "retry")
        if tick is not None:
            return _Successor(job.id, tick, None, 1, "cron")
        return None

    def _final_result(self, outcome: Outcome) -> str:
        """The result column's JSON text; a failure with no retries left says so."""
        job = outcome.job
        result = outcome.result
        if outcome.encoded is not None:
            return outcome.encoded
        if (
            not outcome.success
            and outcome.ending != "cancelled"
            and job.auto_reschedule_on_failure
            and not backoff.attempts_left(job.attempt, job.max_attempts)
            and isinstance(result, dict)
        ):
            result = {
                **result,
                "gave_up": f"attempt {job.attempt} of {job.max_attempts} failed: no retries left",
            }
        return json.dumps(result)

    async def _write(self, batch: list[Outcome]) -> None:
        assert self._conn is not None
        finishing = [o for o in batch if o.ending != "release"]
        releasing = [o for o in batch if o.ending == "release"]
        now = self._db_now()
        successors = [s for o in finishing if (s := self._successor(o, now)) is not None]
        rows = await self._conn.execute(
            statements.get("finish"),
            {
                "ids": _int_array(o.job.id for o in finishing),
                "claims": _int_array(o.job.claims for o in finishing),
                "success": "{" + ",".join("t" if o.success else "f" for o in finishing) + "}",
                "results": "[" + ",".join(self._final_result(o) for o in finishing) + "]",
                "successors": json.dumps(
                    [
                        {
                            "from_id": s.from_id,
                            "due": s.due.isoformat() if s.due else None,
                            "delay_ms": s.delay_ms,
                            "attempt": s.attempt,
                        }
                        for s in successors
                    ]
                ),
                "release_ids": _int_array(o.job.id for o in releasing),
                "release_claims": _int_array(o.job.claims for o in releasing),
            },
        )
        [row] = rows
        accepted: dict[int, datetime] = dict(
            zip(row["done_ids"] or (), row["done_finished"] or (), strict=True)
        )
        successor_of: dict[int, int] = dict(
            zip(row["successor_of"] or (), row["successor_ids"] or (), strict=True)
        )
        self._released += int(row["released"])
        self._batches += 1
        self._written += len(accepted)
        self._rejected += len(finishing) - len(accepted)
        self._successors += len(successor_of)
        events = self._outbox.events_wanted
        for outcome in batch:
            job = outcome.job
            if outcome.ending != "release":
                finished = accepted.get(job.id)
                if finished is None:
                    logger.warning(
                        "job %d (%s): result rejected: the run lost its lease and the job was rescued",  # noqa: E501
                        job.id,
                        job.type,
                        extra={"job_id": job.id, "job_type": job.type},
                    )
                elif events:
                    self._outbox.event(job_event(outcome.ending, job, finished=finished))
                    successor_id = successor_of.get(job.id)
                    if successor_id is not None:
                        self._outbox.event(
                            job_event(
                                "rescheduled", job, finished=finished, successor_id=successor_id
                            )
                        )
            self._on_done(outcome)
