"""Write outcomes in batches: finish rows (fenced), insert retry and cron successors.

Outcomes queue up while a batch is being written, so the batch size follows the load: one
job alone is written at once, thousands per second share a few statements. Each batch is one
statement (``finish``, one round trip, atomic) on the completer's own connection: it finishes
rows fenced by ``claims`` (a run whose claim was lost is rejected and logged), inserts the
successors of the rows it finished, stores the results of runs a handler's transaction
already finished, and gives back released runs.

Retry rule (QuickDapp, fixed): a failure with ``auto_reschedule_on_failure`` gets a new row
after ``auto_reschedule_on_failure_delay`` ms (or exponential backoff; never below the floor of
:mod:`qdworker._schedule.backoff`), copying every user field including ``persistent``, until
``max_attempts``; a cron job always gets its next tick (a failure is retried first if the
retry comes before the tick). A cancelled job gets no successor. A failure that gets no
successor and was not a cancellation is final: its row is marked dead (``dead_at``).

Faults. While the database is away the completer waits for it (its connection is a
:class:`~qdworker._db.connection.Link`) and outcomes queue up in memory, bounded by what the
worker holds (the claimer stops at :data:`~.flow.MAX_UNWRITTEN`). A batch cut off by a broken
connection is written again: the fence makes that safe, and rows the first attempt did finish
count as written (``finish`` reports them). A value Postgres refuses (a NUL character, a date
out of range …) fails only its own job: the batch is split until the offending outcome is
alone, which is then stored as a plain failure saying why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import trio

from .._db import store
from .._db.connect import Backoff, DbOptions, is_transient
from .._db.connection import Link
from .._logs import for_job, module_logger
from .._protocol import job_event
from .._schedule import backoff, cron
from ..errors import DatabaseError, OutcomeUnknownError
from .flow import Flow
from .outbox import Outbox
from .run import Outcome, Run, error_result

logger = module_logger(__name__)

#: Most outcomes written in one statement.
MAX_BATCH: Final = 1000


def _unstorable(exc: Exception) -> dict[str, str]:
    sqlstate = getattr(exc, "sqlstate", None) or "?"
    message = f"the outcome could not be stored (SQLSTATE {sqlstate})"
    return error_result(message, "UnstorableOutcome")


@dataclass(frozen=True)
class _Successor:
    from_id: int
    due: datetime | None
    delay_ms: float | None
    attempt: int


def _is_dead(outcome: Outcome, successor: _Successor | None) -> bool:
    """Is this the final failure of its job: failed, not cancelled, no successor? (A run a
    handler's transaction finished succeeded: its row is not written here.)"""
    return (
        not outcome.success
        and outcome.ending != "cancelled"
        and not outcome.committed
        and successor is None
    )


def _bool_array(values: Iterable[bool]) -> str:
    """A Postgres boolean array literal (cheap to build, like :func:`store.int_array`)."""
    return "{" + ",".join("t" if value else "f" for value in values) + "}"


def _literal(items: list[str]) -> str:
    return "{" + ",".join(items) + "}"


def figure_arrays(runs: Iterable[Run]) -> dict[str, str]:
    """The ``finish`` parameters of the runs' figures (``run.figures``; NULL for a run whose
    handler never ran, or did not end), one array literal per column, in one pass. Outcomes
    are plain words and traceparents hex and dashes: nothing needs quoting."""
    columns: tuple[list[str], ...] = ([], [], [], [], [], [])
    outcome, wall, cpu, shared, rss, span = columns
    for run in runs:
        f = run.figures
        if f is None or f.outcome is None:
            for column in columns:
                column.append("NULL")
            continue
        outcome.append(f.outcome)
        wall.append(f"{f.wall_ms:.3f}")
        cpu.append(f"{f.cpu_ms:.3f}")
        shared.append("t" if f.cpu_shared else "f")
        rss.append("NULL" if f.peak_rss_bytes is None else str(f.peak_rss_bytes))
        span.append(f.traceparent or "NULL")
    return {
        "run_outcome": _literal(outcome),
        "wall_ms": _literal(wall),
        "cpu_ms": _literal(cpu),
        "cpu_shared": _literal(shared),
        "rss": _literal(rss),
        "traceparent": _literal(span),
    }


def _released(runs: list[Run]) -> str:
    """The ``finish`` parameter of runs given back: JSON, with their figures (a rare path)."""
    entries = []
    for run in runs:
        f = run.figures if run.figures is not None and run.figures.outcome else None
        entries.append({
            "id": run.job.id, "claims": run.job.claims,
            "run_outcome": f and f.outcome, "wall_ms": f and f.wall_ms, "cpu_ms": f and f.cpu_ms,
            "cpu_shared": f and f.cpu_shared, "rss": f and f.peak_rss_bytes,
            "traceparent": f and f.traceparent,
        })  # fmt: skip
    return json.dumps(entries)


class Completer:
    """Owns its connection; writes the outcomes of the :class:`~.flow.Flow`'s finished runs.
    A run leaves the flow (:meth:`~.flow.Flow.written`) once its outcome is written, rejected
    or discarded."""

    def __init__(
        self,
        url: str,
        options: DbOptions,
        flow: Flow,
        outbox: Outbox,
        *,
        timezone: str,
        clock_offset: Callable[[], float],
    ) -> None:
        self._link = Link(url, "complete", options)
        self._flow = flow
        self._outbox = outbox
        self._timezone = timezone
        self._clock_offset = clock_offset
        self.written = self.rejected = self.batches = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write outcomes until cancelled."""
        task_status.started()
        async with self._link:
            while True:
                await self.write(await self._flow.take(MAX_BATCH))

    async def aclose(self) -> None:
        """Close the connection (when :meth:`write` was used without :meth:`run`)."""
        await self._link.aclose()

    async def write(self, batch: list[Run]) -> None:
        """Write the outcomes of ``batch`` (finished runs) now; see the module docstring."""
        to_write: list[Run] = []
        for run in batch:
            assert run.outcome is not None
            if run.outcome.ending == "discard":
                for_job(logger, run.job).warning(
                    "job %d (%s): run stopped: %s; its outcome is discarded",
                    run.job.id,
                    run.job.type,
                    run.reason or "its claim was lost",
                )
                self._flow.written(run)
            else:
                to_write.append(run)
        if to_write:
            await self._write_with_retry(to_write)

    async def _write_with_retry(self, batch: list[Run]) -> None:
        """Write ``batch``, waiting out outages; split it if Postgres refuses a value."""
        pause = Backoff()
        while True:
            try:
                await self._write(batch)
                return
            except DatabaseError as exc:
                if not is_transient(exc):
                    await self._write_refused(batch, exc)
                    return
                logger.debug("writing job outcomes failed (%s); retrying", exc)
            await trio.sleep(pause.next())

    async def _write_refused(self, batch: list[Run], exc: DatabaseError) -> None:
        if len(batch) > 1:
            middle = len(batch) // 2
            await self._write_with_retry(batch[:middle])
            await self._write_with_retry(batch[middle:])
            return
        [run] = batch
        assert run.outcome is not None
        if run.outcome.result == _unstorable(exc) or run.outcome.ending == "release":
            # Even the plain failure was refused: leave the row to its lease (it is rescued).
            for_job(logger, run.job).error(
                "job %d (%s): its outcome cannot be stored (%s); leaving it to its lease",
                run.job.id, run.job.type, exc,
            )  # fmt: skip
            self._flow.written(run)
            return
        for_job(logger, run.job).error(
            "job %d (%s): its outcome was refused by the database (%s); storing it as a failure",
            run.job.id, run.job.type, exc,
        )  # fmt: skip
        run.outcome = Outcome("failed", _unstorable(exc), retry=False)
        await self._write_with_retry([run])

    def _db_now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self._clock_offset(), UTC)

    def _successor(self, run: Run, outcome: Outcome, now: datetime) -> _Successor | None:
        job = run.job
        if outcome.ending == "cancelled" or outcome.committed:
            return None  # a committed transaction inserted the successor itself
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
                return _Successor(job.id, None, float(delay), job.attempt + 1)
        if tick is not None:
            return _Successor(job.id, tick, None, 1)
        return None

    def _final_result(self, outcome: Outcome, run: Run) -> str:
        """The result column's JSON text; a failure with no retries left says so."""
        job = run.job
        if outcome.encoded is not None:
            return outcome.encoded
        result = outcome.result
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

    def _plan(self, finishing: list[tuple[Run, Outcome]]) -> list[_Successor | None]:
        """Each finishing run's successor (a retry, the next cron tick) or None."""
        now = self._db_now()
        return [self._successor(run, o, now) for run, o in finishing]

    def finish_params(
        self,
        finishing: list[tuple[Run, Outcome]],
        releasing: list[Run],
        planned: list[_Successor | None] | None = None,
    ) -> dict[str, Any]:
        """The ``finish`` statement's parameters: ``finishing`` runs with their outcomes
        (and their ``planned`` successors, by default planned now), ``releasing`` runs to give
        back."""
        if planned is None:
            planned = self._plan(finishing)
        successors = [s for s in planned if s is not None]
        dead = (_is_dead(o, s) for (_, o), s in zip(finishing, planned, strict=True))
        return {
            "ids": store.int_array(run.job.id for run, _ in finishing),
            "claims": store.int_array(run.job.claims for run, _ in finishing),
            "success": _bool_array(o.success for _, o in finishing),
            "committed": _bool_array(o.committed for _, o in finishing),
            "dead": _bool_array(dead),
            "results": "[" + ",".join(self._final_result(o, run) for run, o in finishing) + "]",
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
            **figure_arrays(run for run, _ in finishing),
            "released": _released(releasing),
            "again": False,
        }

    def transaction_params(self, run: Run, outcome: Outcome) -> dict[str, Any]:
        """``finish`` parameters for a handler's transaction that finishes its own job."""
        return self.finish_params([(run, outcome)], [])

    async def _write(self, batch: list[Run]) -> None:
        # In id order, as the lease keeper's renewals: rows are locked in one order, no deadlock.
        batch = sorted(batch, key=lambda run: run.job.id)
        finishing = [
            (run, run.outcome)
            for run in batch
            if run.outcome is not None and run.outcome.ending != "release"
        ]
        releasing = [run for run in batch if run.outcome and run.outcome.ending == "release"]
        planned = self._plan(finishing)
        params = self.finish_params(finishing, releasing, planned)
        retrying = {s.from_id for s in planned if s is not None and s.attempt > 1}
        while True:
            try:
                result = await self._link.run(lambda raw: store.finish(raw, params))
                break
            except OutcomeUnknownError as exc:
                # Safe to repeat (fenced); rows the lost attempt finished count as written.
                logger.debug("writing outcomes was cut off (%s); writing them again", exc)
                params["again"] = True
        self.batches += 1
        events = self._outbox.events_wanted
        for run in batch:
            outcome = run.outcome
            assert outcome is not None
            if outcome.ending != "release":
                finished = result.finished.get(run.job.id)
                if finished is None:
                    self.rejected += 1
                    for_job(logger, run.job).warning(
                        "job %d (%s): result discarded: this run no longer holds its claim "
                        "(its lease expired and the job was rescued)",
                        run.job.id,
                        run.job.type,
                    )
                else:
                    self.written += 1
                    retried = run.job.id in retrying and run.job.id in result.successors
                    wall_ms = run.figures.wall_ms if run.figures is not None else None
                    self._flow.tally.finished(run.job, outcome.ending, wall_ms, retried=retried)
                    if events:
                        self._event(run, outcome, finished, result.successors.get(run.job.id))
            self._flow.written(run)

    def _event(self, run: Run, outcome: Outcome, finished: datetime, successor: int | None) -> None:
        self._outbox.event(job_event(outcome.ending, run.job, finished=finished))
        if successor is not None:
            self._outbox.event(
                job_event("rescheduled", run.job, finished=finished, successor_id=successor)
            )
