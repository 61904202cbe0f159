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
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar, cast

import psycopg

from ._db import statements, store
from ._db.connect import DEFAULT_TIMEOUT_SECONDS, DbOptions, translate
from ._db.connection import Connection, Link
from ._model import USER_FIELDS, Job
from ._schedule import backoff as backoff_rules
from ._schedule import cron
from .errors import DatabaseError, InvalidJobError

CancelOutcome = Literal["cancelled", "cancelling", "finished", "not_found"]

#: Longest tag, type, queue, concurrency key and cron schedule (the CHECK constraints agree).
MAX_NAME_CHARS = 255
#: Largest priority either way (the CHECK constraint agrees); one step is a minute of waiting.
MAX_PRIORITY = 1_000_000
#: Largest ``data`` accepted through the API, as JSON.
MAX_DATA_BYTES = 1024 * 1024
#: Most jobs in one ``submit_jobs`` call (one statement).
MAX_BATCH = 100_000
#: Most dead jobs one ``dead_jobs`` call lists.
MAX_DEAD_LIST = 10_000
#: Most dead jobs one ``retry_dead`` call redrives (``qdworker_retry_dead`` agrees).
MAX_RETRY_DEAD = 100_000


def prepare_job(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one job's fields; return the JSON-ready dict ``insert_jobs`` takes.

    Raises :class:`InvalidJobError` naming the first bad field. ``due`` may be an aware
    ``datetime`` (absolute), a ``timedelta`` or a number of seconds (relative to the database
    clock), or ``None`` (now).
    """
    unknown = set(fields) - set(USER_FIELDS)
    if unknown:
        raise InvalidJobError(
            f"unknown job field(s) {sorted(unknown)}; accepted: {', '.join(USER_FIELDS)}"
        )
    out: dict[str, Any] = {"type": _name("type", fields.get("type")), "data": _data(fields)}
    for key, check in _OPTIONAL_FIELDS.items():
        value = fields.get(key)
        if value is not None:
            out.update(check(key, value))
    return out


def _name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_CHARS:
        raise InvalidJobError(
            f"{key} must be a non-empty string of at most {MAX_NAME_CHARS} characters"
        )
    return value


def _data(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    data = fields.get("data")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidJobError(f"data must be a JSON object (a dict), not {type(data).__name__}")
    try:
        encoded = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidJobError(f"data is not JSON-serialisable: {exc}") from None
    if len(encoded) > MAX_DATA_BYTES:
        raise InvalidJobError(
            f"data is {len(encoded)} bytes as JSON; the limit is {MAX_DATA_BYTES}"
        )
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(key: str, value: Any) -> dict[str, Any]:
    return {key: _name(key, value)}


def _count(key: str, value: Any) -> dict[str, Any]:
    if not _is_int(value) or value < 0:
        raise InvalidJobError(f"{key} must be an integer >= 0")
    return {key: value}


def _flag(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, bool):
        raise InvalidJobError(f"{key} must be true or false")
    return {key: value}


def _due(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidJobError("due must be a timezone-aware datetime")
        return {"due": value.isoformat()}
    if isinstance(value, timedelta):
        return {"delay_ms": value.total_seconds() * 1000}
    if (_is_int(value) or isinstance(value, float)) and math.isfinite(value):
        return {"delay_ms": float(value) * 1000}
    raise InvalidJobError("due must be a datetime, a timedelta or a number of seconds")


def _cron_schedule(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, str):
        raise InvalidJobError("cron_schedule must be a string")
    try:
        return {key: cron.validate(value)}
    except ValueError as exc:
        raise InvalidJobError(str(exc)) from None


def _max_attempts(key: str, value: Any) -> dict[str, Any]:
    if not _is_int(value) or value < 1:
        raise InvalidJobError("max_attempts must be an integer >= 1 (or None: unlimited)")
    return {key: value}


def _backoff(key: str, value: Any) -> dict[str, Any]:
    if value not in backoff_rules.BACKOFFS:
        raise InvalidJobError(f"backoff must be one of {', '.join(backoff_rules.BACKOFFS)}")
    return {key: value}


def _priority(key: str, value: Any) -> dict[str, Any]:
    if not _is_int(value) or abs(value) > MAX_PRIORITY:
        raise InvalidJobError(f"priority must be an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}")
    return {key: value}


def _timeout(key: str, value: Any) -> dict[str, Any]:
    if not (_is_int(value) or isinstance(value, float)) or not value > 0:
        raise InvalidJobError("timeout_seconds must be a number > 0")
    return {key: float(value)}


#: How each optional field is checked (``None`` means "not given"), in the order reported.
_OPTIONAL_FIELDS: dict[str, Callable[[str, Any], dict[str, Any]]] = {
    "tag": _text,
    "user_id": _count,
    "auto_reschedule_on_failure_delay": _count,
    "remove_delay": _count,
    "auto_reschedule_on_failure": _flag,
    "persistent": _flag,
    "due": _due,
    "cron_schedule": _cron_schedule,
    "max_attempts": _max_attempts,
    "backoff": _backoff,
    "timeout_seconds": _timeout,
    "queue": _text,
    "priority": _priority,
    "concurrency_key": _text,
}


def dead_filters(
    type: str | None,
    queue: str | None,
    error_type: str | None,
    since: datetime | None,
    until: datetime | None,
) -> dict[str, Any]:
    """The filters of dead-job listing and redrive, checked (``None``: any). Raises
    :class:`InvalidJobError` naming the first bad one."""
    filters = {"type": type, "queue": queue, "error_type": error_type}
    for key, value in filters.items():
        if value is not None:
            _name(key, value)
    for key, moment in (("since", since), ("until", until)):
        if moment is not None and (not isinstance(moment, datetime) or moment.tzinfo is None):
            raise InvalidJobError(f"{key} must be a timezone-aware datetime (or None)")
    return {**filters, "since": since, "until": until}


def _limit(value: Any, maximum: int) -> int:
    if not _is_int(value) or not 1 <= value <= maximum:
        raise InvalidJobError(f"limit must be an integer from 1 to {maximum}")
    return int(value)


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
        """Insert one job; return it as stored (with its id). See :func:`prepare_job`."""
        prepared = prepare_job(fields)
        params = {key: prepared.get(key) for key in _SINGLE_PARAMS}
        params["data"] = json.dumps(prepared["data"])
        if connection is not None:
            [job] = await _on_callers(connection, "insert_job", params)
            return job
        return await self._run(lambda raw: store.insert_job(raw, params))

    async def submit_jobs(
        self, jobs: Iterable[Mapping[str, Any]], *, connection: Any = None
    ) -> list[Job]:
        """Insert many jobs in one statement; return them in the order given."""
        prepared = [prepare_job(fields) for fields in jobs]
        if len(prepared) > MAX_BATCH:
            raise InvalidJobError(f"submit_jobs takes at most {MAX_BATCH} jobs per call")
        if not prepared:
            return []
        if connection is not None:
            inserted = await _on_callers(connection, "insert_jobs", {"jobs": json.dumps(prepared)})
            return sorted(inserted, key=lambda job: job.id)
        return await self._run(lambda raw: store.insert_jobs(raw, prepared))

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
        checked = _limit(limit, MAX_DEAD_LIST)
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
        checked = _limit(limit, MAX_RETRY_DEAD)

        def call(raw: Raw) -> list[Job]:
            with raw.transaction():
                pairs = store.retry_dead(raw, filters, checked)
                return store.get_jobs(raw, (new for _, new in pairs if new is not None))

        return await self._run(call)

    async def _run(self, fn: Callable[[Raw], T], *, idempotent: bool = False) -> T:
        if self._link is None:
            raise RuntimeError("Queue is not open: use 'async with Queue(...) as queue'")
        return await self._link.run(fn, idempotent=idempotent)


async def _on_callers(connection: Any, name: str, params: Mapping[str, Any]) -> list[Job]:
    """Run statement ``name`` on the caller's own connection (inside their transaction)."""
    query = statements.get(name)
    if isinstance(connection, psycopg.AsyncConnection):
        try:
            async with connection.cursor(row_factory=store.job_row, binary=True) as cur:
                await cur.execute(cast(Any, query), params)
                return await cur.fetchall()
        except psycopg.Error as exc:
            raise translate(exc) from exc
    if isinstance(connection, psycopg.Connection):

        def call(raw: Raw) -> list[Job]:
            with raw.cursor(row_factory=store.job_row, binary=True) as cur:
                cur.execute(cast(Any, query), params)
                return cur.fetchall()

        return await Connection(connection, deadline=None).run(call)
    raise TypeError("connection must be a psycopg Connection or AsyncConnection")


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
