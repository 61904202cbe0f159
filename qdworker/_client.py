"""Submitting, cancelling and redriving jobs from an application: :class:`Queue`.

The same code works under trio and asyncio (anyio)::

    async with qdworker.Queue(dsn) as queue:
        job = await queue.submit_job(type="sendEmail", data={"to": "a@b.c"}, tag="email:42")
        jobs = await queue.submit_jobs([{"type": "resize", "data": {"id": 1}}])  # one round trip
        await queue.submit_job(type="audit", connection=conn)  # inside the caller's transaction

Input is validated before anything is written (:class:`~qdworker.errors.InvalidJobError`).
A :class:`Queue` owns one connection and runs one statement at a time; pass ``connection=`` to
use one of the caller's own (a psycopg ``Connection`` or, under asyncio, ``AsyncConnection``),
so the job exists only if the caller's transaction commits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Literal, TypeVar, cast, overload

import psycopg

from . import _queues as queues
from . import _tracing as tracing
from ._db import _batches as batches
from ._db import statements, store
from ._db.connect import DEFAULT_TIMEOUT_SECONDS, DbOptions, translate
from ._db.connection import Connection, Link
from ._fields import (
    MAX_BATCH,
    MAX_DEAD_LIST,
    MAX_RETRY_DEAD,
    check_limit,
    dead_filters,
    prepare_job,
)
from ._model import USER_FIELDS, Batch, Job
from ._queues import QueueInfo
from .errors import DatabaseError, InvalidJobError

CancelOutcome = Literal["cancelled", "cancelling", "finished", "not_found"]

#: Parameters of the single-job ``insert_job`` statement.
_SINGLE_PARAMS = (*USER_FIELDS, "delay_ms")

Raw = psycopg.Connection[Any]
T = TypeVar("T")


class Queue:
    """A client of one qdworker database. Use as an async context manager (or :meth:`open` /
    :meth:`aclose`). ``dsn`` defaults to ``DATABASE_URL`` or the running embedded server.

    It owns one connection and reopens it by itself: after a database restart or a terminated
    backend the next call just works. A call that finds the database unreachable raises
    :class:`~qdworker.errors.DatabaseUnavailableError` (nothing was written; a connection found
    broken before sending is replaced and the call made again once). A call cut off after its
    statement was sent raises :class:`~qdworker.errors.OutcomeUnknownError`: the job may or may
    not have been written (look for it, e.g. by its tag, before submitting it again).
    """

    def __init__(self, dsn: str | None = None, *, db_timeout: float = DEFAULT_TIMEOUT_SECONDS):
        self._dsn = dsn
        self._options = DbOptions(db_timeout)
        self._link: Link | None = None

    async def open(self) -> Queue:
        """Connect (raises :class:`~qdworker.errors.DatabaseUnavailableError` if it cannot)."""
        if self._link is None:
            link = Link(self._dsn or _default_dsn(), "client", self._options, persistent=False)
            await link.connection()
            self._link = link
        return self

    async def aclose(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            await link.aclose()

    async def __aenter__(self) -> Queue:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def submit_job(self, *, connection: Any = None, **fields: Any) -> Job:
        """Insert one job; return it as stored (with its id). See :func:`prepare_job`.

        A job with a tag cancels the pending job of that tag (QuickDapp's rule). With
        ``on_tag_conflict="keep"`` it is instead not inserted while its tag has a pending or
        running job, and that job is returned (the newest, if several), read after the insert
        in the same transaction; if it finished in between, this job is inserted after all.
        To know which happened, put something unique to the call in ``data`` (a request id)
        and look for it in the returned job's ``data``: creation times and ids do not tell
        reliably. Concurrent keep-mode submissions of one tag leave one unfinished job.

        ``depends_on=[ids]`` makes it wait until those jobs succeeded (README, "Dependencies
        and batches"); an id with no row raises :class:`~qdworker.errors.DatabaseError`
        (SQLSTATE 23503) naming it, and nothing is written.
        """
        prepared = prepare_job(fields)
        if prepared.get("on_tag_conflict") == "keep":
            [job] = await self._keeping([prepared], connection)
            return job
        params = {key: prepared.get(key) for key in _SINGLE_PARAMS}
        params["data"] = json.dumps(prepared["data"])
        trace_context = tracing.current_context()
        params["trace_context"] = None if trace_context is None else json.dumps(trace_context)
        if connection is not None:
            [job] = await _on_callers(connection, store.statement_rows("insert_job", params))
            return cast(Job, job)
        return await self._run(lambda raw: store.insert_job(raw, params))

    @overload
    async def submit_jobs(
        self, jobs: Iterable[Mapping[str, Any]], *, then: None = None, connection: Any = None
    ) -> list[Job]: ...

    @overload
    async def submit_jobs(
        self, jobs: Iterable[Mapping[str, Any]], *, then: Mapping[str, Any], connection: Any = None
    ) -> Batch: ...

    async def submit_jobs(
        self,
        jobs: Iterable[Mapping[str, Any]],
        *,
        then: Mapping[str, Any] | None = None,
        connection: Any = None,
    ) -> list[Job] | Batch:
        """Insert many jobs in one statement; return them in the order given.

        For an entry with ``on_tag_conflict="keep"`` the list holds the job kept instead, if
        any (see :meth:`submit_job`). Entries are inserted in order, so of keep-mode entries
        sharing a tag the first may be inserted and the later ones get it. A batch with
        keep-mode entries runs in one transaction: the insert, then the read of the jobs kept.

        With ``then`` (the fields of one more job), that job depends on every job of the
        batch (fan-in: it runs once they all succeeded, see ``depends_on``), all inserted in
        one statement; the result is a :class:`Batch`. Keep-mode entries are refused with it
        (:class:`~qdworker.errors.InvalidJobError`), as is an empty batch.
        """
        prepared = [prepare_job(fields) for fields in jobs]
        if len(prepared) > MAX_BATCH:
            raise InvalidJobError(f"submit_jobs takes at most {MAX_BATCH} jobs per call")
        trace_context = tracing.current_context()
        if trace_context is not None:
            for entry in prepared:
                entry["trace_context"] = trace_context
        if then is not None:
            return await self._with_then(prepared, batches.prepare_then(prepared, then), connection)
        if not prepared:
            return []
        if any(entry.get("on_tag_conflict") == "keep" for entry in prepared):
            return await self._keeping(prepared, connection)
        if connection is not None:
            steps = store.statement_rows("insert_jobs", {"jobs": json.dumps(prepared)})
            inserted = await _on_callers(connection, steps)
            return sorted(inserted, key=lambda job: job.id)
        return await self._run(lambda raw: store.insert_jobs(raw, prepared))

    async def _with_then(
        self, prepared: list[dict[str, Any]], then: dict[str, Any], connection: Any
    ) -> Batch:
        params = batches.then_params(prepared, then)
        if connection is not None:
            return await _on_callers(connection, batches.then_steps(params))
        return await self._run(lambda raw: store.run_steps(raw, batches.then_steps(params)))

    async def _keeping(self, prepared: list[dict[str, Any]], connection: Any) -> list[Job]:
        if connection is not None:
            return await _on_callers(connection, store.keep_rounds(prepared), atomic=True)
        return await self._run(lambda raw: store.insert_jobs_keeping(raw, prepared))

    async def get_job(self, job_id: int) -> Job | None:
        return await self._run(lambda raw: store.get_job(raw, job_id), idempotent=True)

    async def cancel_job(self, job_id: int, reason: str | None = None) -> CancelOutcome:
        """Cancel a job: ``'cancelled'`` (was pending), ``'cancelling'`` (running: its worker
        cancels the handler within a second), ``'finished'`` (no-op) or ``'not_found'``.
        Safe to repeat, so a call cut off by a broken connection is made again."""
        outcome = await self._run(
            lambda raw: store.cancel_job(raw, job_id, reason), idempotent=True
        )
        return cast(CancelOutcome, outcome)

    async def set_queue(self, name: str, **settings: Any) -> None:
        """Change the settings of queue ``name`` (see ``worker_queues``): ``paused``,
        ``concurrency``, ``key_concurrency``, ``rate_limit``, ``rate_period_ms``, ``fair``,
        ``key_weights``. Only those given change; ``None`` clears a limit. Every worker
        applies them to its next claim (within a second). Raises
        :class:`~qdworker.errors.InvalidQueueError` before writing anything."""
        changes = queues.settings_changes(settings)
        queues.check_name(name)
        await self._run(lambda raw: queues.set_queue(raw, name, changes), idempotent=True)

    async def pause_queue(self, name: str) -> None:
        """Start no new job of queue ``name`` anywhere (running ones finish)."""
        await self.set_queue(name, paused=True)

    async def resume_queue(self, name: str) -> None:
        await self.set_queue(name, paused=False)

    async def reset_queue(self, name: str) -> bool:
        """Forget the settings of queue ``name`` (no limits, not paused); whether it had any."""
        queues.check_name(name)
        return await self._run(lambda raw: queues.reset_queue(raw, name), idempotent=True)

    async def list_queues(self) -> list[QueueInfo]:
        """Every queue with settings or unfinished jobs: settings, depth, running jobs."""
        return await self._run(queues.list_queues, idempotent=True)

    async def dead_jobs(
        self,
        *,
        type: str | None = None,
        queue: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Dead jobs (failed for good, see ``Job.dead_at``), the latest death first, at most
        ``limit`` (1 to :data:`MAX_DEAD_LIST`). Filters (``None``: any): ``type``, ``queue``,
        the result's ``error_type``, and when they died (``since`` included, ``until`` not;
        aware datetimes). Raises :class:`InvalidJobError` for a bad filter or limit."""
        filters = dead_filters(type, queue, error_type, since, until)
        checked = check_limit(limit, MAX_DEAD_LIST)
        return await self._run(lambda raw: store.dead_jobs(raw, filters, checked), idempotent=True)

    async def retry_job(self, job_id: int) -> Job | None:
        """Redrive a dead job: a new attempt, due now, copying its fields, linked to it by
        ``rescheduled_from_job``, with ``attempt + 1`` and a fresh retry budget (its
        ``max_attempts`` grows by the attempts spent); the dead row stops being dead. Returns
        the new attempt, or ``None`` when the job is not dead (not found, not failed for good,
        redriven already) or another unfinished job has its tag. A call cut off after it was
        sent raises :class:`~qdworker.errors.OutcomeUnknownError`; calling again never makes
        a second attempt (it returns ``None`` if the first call went through)."""

        def call(raw: Raw) -> Job | None:
            with raw.transaction():
                new_id = store.retry_job(raw, job_id)
                return None if new_id is None else store.get_job(raw, new_id)

        return await self._run(call)

    async def retry_dead(
        self,
        *,
        type: str | None = None,
        queue: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[Job]:
        """Redrive up to ``limit`` (1 to :data:`MAX_RETRY_DEAD`) dead jobs matching the
        filters of :meth:`dead_jobs`, the oldest death first, each as :meth:`retry_job` does,
        in one transaction; returns the new attempts in id order. Dead jobs another unfinished
        job's tag supersedes stay dead; rows another transaction holds are left for later.
        Raises :class:`InvalidJobError` for a bad filter or limit, and, like
        :meth:`retry_job`, :class:`~qdworker.errors.OutcomeUnknownError` when cut off."""
        filters = dead_filters(type, queue, error_type, since, until)
        checked = check_limit(limit, MAX_RETRY_DEAD)

        def call(raw: Raw) -> list[Job]:
            with raw.transaction():
                pairs = store.retry_dead(raw, filters, checked)
                return store.get_jobs(raw, (new for _, new in pairs if new is not None))

        return await self._run(call)

    async def _run(self, fn: Callable[[Raw], T], *, idempotent: bool = False) -> T:
        if self._link is None:
            raise RuntimeError("Queue is not open: use 'async with Queue(...) as queue'")
        return await self._link.run(fn, idempotent=idempotent)


async def _on_callers(connection: Any, steps: store.Steps[T], *, atomic: bool = False) -> T:
    """Run ``steps`` on the caller's own connection (inside their transaction; in one of its
    own when it is in autocommit mode and ``atomic``). Raises ``TypeError`` for anything but a
    psycopg ``Connection`` or ``AsyncConnection``; database errors as qdworker's."""
    if isinstance(connection, psycopg.AsyncConnection):
        try:
            if atomic and connection.autocommit:
                async with connection.transaction():
                    return await _run_async(connection, steps)
            return await _run_async(connection, steps)
        except psycopg.Error as exc:
            raise translate(exc) from exc
    if isinstance(connection, psycopg.Connection):

        def call(raw: Raw) -> T:
            if atomic and raw.autocommit:
                with raw.transaction():
                    return store.run_steps(raw, steps)
            return store.run_steps(raw, steps)

        return await Connection(connection, deadline=None).run(call)
    raise TypeError("connection must be a psycopg Connection or AsyncConnection")


async def _run_async(connection: psycopg.AsyncConnection[Any], steps: store.Steps[T]) -> T:
    """:func:`store.run_steps` on an asyncio connection."""
    try:
        name, params = next(steps)
        while True:
            async with connection.cursor(row_factory=store.maybe_job_row, binary=True) as cur:
                await cur.execute(cast(Any, statements.get(name)), params)
                rows = await cur.fetchall()
            name, params = steps.send(rows)
    except StopIteration as done:
        return cast(T, done.value)


def _default_dsn() -> str:
    from . import _config as config_module
    from . import _devdb as devdb

    settings = config_module.load()
    if settings.database_url:
        return settings.database_url
    url = devdb.url_for(settings.data_dir)
    if url is None:
        raise DatabaseError(
            f"DATABASE_URL is not set and no embedded Postgres runs in {settings.data_dir}: "
            "start 'python -m qdworker' first, or set DATABASE_URL"
        )
    return url
