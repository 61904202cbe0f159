"""Every statement of the job's path, as a function: the worker's, the client's, the
supervisor's. The SQL itself lives in ``sql/queries/*.sql`` (see :mod:`.statements`); here it
gets its parameters and its rows become Python values, ``Job`` rows by column name.

Each function takes a psycopg connection and blocks: call it through
:meth:`.connection.Link.run` or :meth:`.connection.Connection.run` (a worker thread). Errors
are psycopg's; the caller's connection layer translates them (:func:`.connect.translate`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

import psycopg
from psycopg.rows import RowMaker

from .._model import COLUMNS, Job
from .._registry import CronJob
from .._schedule import cron
from ..errors import DatabaseError
from . import statements

Raw = psycopg.Connection[Any]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Claimed:
    job: Job
    lost: bool  # the previous run of this row was lost with its worker
    run_order: datetime | None = None  # its place in its queue (None: a lost run, or limited)


def int_array(values: Iterable[int]) -> str:
    """A Postgres array literal: far cheaper to build than psycopg's list adaptation."""
    return "{" + ",".join(map(str, values)) + "}"


def _positions(cursor: Any) -> tuple[tuple[int, ...], dict[str, int]]:
    names = [column.name for column in cursor.description or ()]
    try:
        job = tuple(names.index(name) for name in COLUMNS)
    except ValueError as exc:
        raise RuntimeError(f"a job row lacks a column of qdworker.Job: {exc}") from None
    extra = {name: i for i, name in enumerate(names) if name not in COLUMNS}
    return job, extra


def job_row(cursor: Any) -> RowMaker[Job]:
    """Row factory: a :class:`Job` from its columns, by name (extra columns are ignored)."""
    job, _ = _positions(cursor)

    def make(values: Sequence[Any]) -> Job:
        return Job(*[values[i] for i in job])

    return make


def maybe_job_row(cursor: Any) -> RowMaker[Job | None]:
    """Row factory: :func:`job_row`, but ``None`` for a row whose ``id`` is NULL (an entry of
    ``insert_jobs_per_entry`` the insert trigger skipped)."""
    job, _ = _positions(cursor)
    id_at = job[COLUMNS.index("id")]

    def make(values: Sequence[Any]) -> Job | None:
        return None if values[id_at] is None else Job(*[values[i] for i in job])

    return make


def _claimed_row(cursor: Any) -> RowMaker[Claimed]:
    job, extra = _positions(cursor)
    lost = extra["lost"]
    order = extra.get("run_order")

    def make(values: Sequence[Any]) -> Claimed:
        run_order = None if order is None else values[order]
        return Claimed(Job(*[values[i] for i in job]), bool(values[lost]), run_order)

    return make


def _rows(raw: Raw, name: str, params: Mapping[str, Any], factory: Callable[..., Any]) -> Any:
    with raw.cursor(row_factory=factory, binary=True) as cur:
        cur.execute(statements.get(name), params)
        return cur.fetchall()


def _one(raw: Raw, name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    row = raw.execute(statements.get(name), params).fetchone()
    assert row is not None, name
    return cast(dict[str, Any], row)


# ------------------------------------------------------------------------------- worker


def server_epoch(raw: Raw) -> tuple[float | None, bool]:
    """(seconds since the server started serving after its last restart or failover, None if
    there was none since the database was created; whether that was a failover)."""
    row = _one(raw, "server_epoch")
    seconds = row["serving_seconds"]
    return (None if seconds is None else float(seconds)), bool(row["failover"])


#: Where a worker's scan of each queue starts: queue -> (run order, id) of the last job it
#: claimed from it (the claim's fast path while a backlog drains).
Cursors = Mapping[str, tuple[datetime, int]]


def claim(
    raw: Raw,
    *,
    limit: int,
    owner: str,
    lease_seconds: float,
    types: Sequence[str],
    queues: Sequence[str] | None,
    rescue: bool,
    cursors: Cursors | None = None,
) -> list[Claimed]:
    """Claim from the unlimited queues ``queues`` serves (None: all); see ``claim`` in
    sql/queries/worker.sql. With ``cursors`` each queue's scan starts after its cursor."""
    after = cursors or {}
    params = {
        "limit": limit, "owner": owner, "lease_seconds": lease_seconds, "types": list(types),
        "queues": None if queues is None else list(queues), "rescue": rescue,
        "cursor_queues": list(after), "cursor_orders": [c[0] for c in after.values()],
        "cursor_ids": [c[1] for c in after.values()],
    }  # fmt: skip
    return cast(list[Claimed], _rows(raw, "claim", params, _claimed_row))


def claim_limited(
    raw: Raw,
    *,
    limit: int,
    owner: str,
    lease_seconds: float,
    types: Sequence[str],
    queues: Sequence[str] | None,
    rescue: bool,
) -> list[Claimed]:
    """Claim from the limited queues ``queues`` serves (see ``qdworker_claim_limited``)."""
    params = {
        "limit": limit, "owner": owner, "lease_seconds": lease_seconds, "types": list(types),
        "queues": None if queues is None else list(queues), "rescue": rescue,
    }  # fmt: skip
    return cast(list[Claimed], _rows(raw, "claim_limited", params, _claimed_row))


def limited_queues(raw: Raw, *, queues: Sequence[str] | None) -> bool:
    """Whether ``queues`` (None: all) include a limited, unpaused queue."""
    row = _one(raw, "limited_queues", {"queues": None if queues is None else list(queues)})
    return bool(row["limited"])


def next_wakeup(
    raw: Raw, *, owner: str, types: Sequence[str], queues: Sequence[str] | None
) -> tuple[float | None, float]:
    """(seconds until the next pending job of ``types`` in ``queues`` is due, a foreign lease
    expires or a rate-limited queue may start a job again, or None; the database clock as
    epoch seconds)."""
    params = {"owner": owner, "types": list(types),
              "queues": None if queues is None else list(queues)}  # fmt: skip
    row = _one(raw, "next_wakeup", params)
    seconds = row["seconds"]
    return (None if seconds is None else float(seconds)), float(row["db_epoch"])


def release_orphans(raw: Raw, *, owner: str, held: Iterable[int]) -> int:
    row = _one(raw, "release_orphans", {"owner": owner, "held": int_array(held)})
    return int(row["n"])


@dataclass(frozen=True, slots=True)
class FinishResult:
    finished: dict[int, datetime]  # job id -> finished time, for every accepted outcome
    successors: dict[int, int]  # job id -> id of its retry or next cron tick
    released: int


def finish(raw: Raw, params: Mapping[str, Any]) -> FinishResult:
    row = _one(raw, "finish", params)
    finished = dict(zip(row["done_ids"] or (), row["done_finished"] or (), strict=True))
    finished.update(zip(row["already_ids"] or (), row["already_finished"] or (), strict=True))
    successors = dict(zip(row["successor_of"] or (), row["successor_ids"] or (), strict=True))
    return FinishResult(finished, successors, int(row["released"]))


@dataclass(frozen=True, slots=True)
class Renewal:
    job_id: int
    cancel_requested: bool


def heartbeat(
    raw: Raw,
    *,
    owner: str,
    supervisor: str | None,
    host: str,
    pid: int,
    types: Sequence[str],
    concurrency: int,
    lease_seconds: float,
    runs: Sequence[tuple[int, int]],
    report: Mapping[str, int | None],
) -> list[Renewal]:
    """Register the worker with its ``report`` (slot, restarts, rss_bytes, jobs_run,
    jobs_failed) and renew the leases of ``runs`` ((job id, claims) pairs); returns the runs
    still held. Runs missing from the answer are no longer this worker's."""
    rows = raw.execute(
        statements.get("heartbeat"),
        {
            "owner": owner,
            "supervisor": supervisor,
            "host": host,
            "pid": pid,
            "types": list(types),
            "concurrency": concurrency,
            "lease_seconds": lease_seconds,
            "ids": int_array(job_id for job_id, _ in runs),
            "claims": int_array(claims for _, claims in runs),
            **report,
        },
    ).fetchall()
    return [Renewal(int(row["id"]), bool(row["cancel_requested"])) for row in rows]


def worker_exit(raw: Raw, *, owner: str, keep: Iterable[int], report: Mapping[str, Any]) -> int:
    """Release every run leased to ``owner`` but ``keep``; mark the worker stopped (with the
    ``jobs_run`` and ``jobs_failed`` of its ``report``)."""
    params = {"owner": owner, "keep": int_array(keep), **report}
    return int(_one(raw, "worker_exit", params)["n"])


def release_worker_leases(raw: Raw, worker_id: str, signal: str | None = None) -> int:
    """A worker process died (killed by ``signal``, None: it exited): end its leases now and
    record its runs as lost (they are rescued as lost runs)."""
    params = {"worker_id": worker_id, "signal": signal}
    return int(_one(raw, "release_worker_leases", params)["n"])


# ------------------------------------------------------------------------------- supervisor


def unknown_types(raw: Raw) -> list[tuple[str, datetime | None]]:
    """(type, when a worker running it was last seen) for each type no live worker runs."""
    rows = raw.execute(statements.get("unknown_types")).fetchall()
    return [(str(row["type"]), row["last_seen"]) for row in rows]


def fail_unknown_type(
    raw: Raw, job_type: str, last_seen: datetime | None, *, limit_seconds: float, batch: int
) -> int:
    """Fail up to ``batch`` overdue pending jobs of ``job_type``; returns how many."""
    cur = raw.execute(
        statements.get("fail_unknown_type"),
        {"type": job_type, "last_seen": last_seen, "limit_seconds": limit_seconds,
         "batch": batch},
    )  # fmt: skip
    return cur.rowcount


def forget_workers(raw: Raw, *, older_than_seconds: float) -> int:
    cur = raw.execute(statements.get("forget_workers"), {"older_than_seconds": older_than_seconds})
    return cur.rowcount


def ensure_cron_job(raw: Raw, cron_job: CronJob, timezone: str) -> int | None:
    """Insert ``cron_job``'s first row unless its chain has an unfinished one, under its
    tag's lock (one transaction); returns the new row's id, or None."""
    with raw.transaction():
        raw.execute(statements.get("tag_lock"), {"tag": cron_job.tag})
        now = _one(raw, "db_now")["now"]
        inserted = raw.execute(
            statements.get("insert_cron_if_absent"),
            {
                "tag": cron_job.tag,
                "type": cron_job.type,
                "due": cron.next_tick(cron_job.schedule, now, now, timezone),
                "cron_schedule": cron_job.schedule,
                "retry_delay_ms": cron_job.retry_delay_ms,
            },
        ).fetchone()
    return None if inserted is None else int(inserted["id"])


# ------------------------------------------------------------------------------- client


def insert_job(raw: Raw, params: Mapping[str, Any]) -> Job:
    [job] = _rows(raw, "insert_job", params, job_row)
    return cast(Job, job)


def insert_jobs(raw: Raw, prepared: Sequence[Mapping[str, Any]]) -> list[Job]:
    jobs = _rows(raw, "insert_jobs", {"jobs": json.dumps(prepared)}, job_row)
    return sorted(cast(list[Job], jobs), key=lambda job: job.id)


#: Statements to run one after the other, each answered with its rows (``maybe_job_row``),
#: then a result: the client's submissions, apart from the connection they run on.
Steps = Generator[tuple[str, Mapping[str, Any]], list[Any], T]

#: Rounds of a keep-mode submission (see :func:`keep_rounds`).
_KEEP_ROUNDS = 2


def statement_rows(name: str, params: Mapping[str, Any]) -> Steps[list[Any]]:
    """One statement; its rows."""
    rows = yield name, params
    return rows


def keep_rounds(prepared: Sequence[Mapping[str, Any]]) -> Steps[list[Job]]:
    """Insert jobs some of which are in keep mode; each entry's inserted or kept job, in order.

    Run them in one transaction. A skipped entry gets the newest unfinished job of its tag,
    read by a later statement (so it sees jobs committed meanwhile). If that job finished in
    between, nothing of the tag is unfinished and, the transaction holding the tag's lock since
    the insert, nothing can become so: the entry is inserted in a second round (of several
    such entries of one tag the first; the others get it). Raises :class:`DatabaseError` if a
    second round is not enough, which only a row of the tag made unfinished again by hand can
    cause.
    """
    jobs: list[Job | None] = [None] * len(prepared)
    todo = list(range(len(prepared)))
    for _ in range(_KEEP_ROUNDS):
        batch = json.dumps([prepared[i] for i in todo])
        rows = yield "insert_jobs_per_entry", {"jobs": batch}
        for i, row in zip(todo, rows, strict=True):
            jobs[i] = row
        skipped = [i for i in todo if jobs[i] is None]
        if not skipped:
            return cast(list[Job], jobs)
        tags = sorted({prepared[i]["tag"] for i in skipped})
        holders = {job.tag: job for job in (yield "tag_holders", {"tags": tags})}
        for i in skipped:
            jobs[i] = holders.get(prepared[i]["tag"])
        todo = [i for i in skipped if jobs[i] is None]
        if not todo:
            return cast(list[Job], jobs)
    tags = sorted({prepared[i]["tag"] for i in todo})
    raise DatabaseError(f"keep mode: the unfinished jobs of tags {tags} vanished twice")


def run_steps(raw: Raw, steps: Steps[T]) -> T:
    """Run ``steps`` on ``raw``; their result."""
    try:
        name, params = next(steps)
        while True:
            name, params = steps.send(_rows(raw, name, params, maybe_job_row))
    except StopIteration as done:
        return cast(T, done.value)


def insert_jobs_keeping(raw: Raw, prepared: Sequence[Mapping[str, Any]]) -> list[Job]:
    """:func:`keep_rounds` in a transaction of its own."""
    with raw.transaction():
        return run_steps(raw, keep_rounds(prepared))


def get_job(raw: Raw, job_id: int) -> Job | None:
    rows = _rows(raw, "get_job", {"id": job_id}, job_row)
    return cast(Job, rows[0]) if rows else None


def cancel_job(raw: Raw, job_id: int, reason: str | None) -> str:
    return str(_one(raw, "cancel_job", {"id": job_id, "reason": reason})["outcome"])


def get_jobs(raw: Raw, job_ids: Iterable[int]) -> list[Job]:
    """The jobs of ``job_ids`` that exist, in id order."""
    return cast(list[Job], _rows(raw, "get_jobs", {"ids": int_array(job_ids)}, job_row))


def dead_jobs(raw: Raw, filters: Mapping[str, Any], limit: int) -> list[Job]:
    """Dead jobs matching ``filters`` (type, queue, error_type, since, until; None: any), the
    latest death first, at most ``limit``."""
    return cast(list[Job], _rows(raw, "dead_jobs", {**filters, "limit": limit}, job_row))


def retry_job(raw: Raw, job_id: int) -> int | None:
    """Redrive dead job ``job_id``; the new attempt's id, or None (see qdworker_retry_job)."""
    new_id = _one(raw, "retry_job", {"id": job_id})["new_id"]
    return None if new_id is None else int(new_id)


def retry_dead(raw: Raw, filters: Mapping[str, Any], limit: int) -> list[tuple[int, int | None]]:
    """Redrive up to ``limit`` dead jobs matching ``filters`` (as :func:`dead_jobs`);
    (dead job id, new attempt id or None when skipped) pairs, oldest death first."""
    rows = raw.execute(statements.get("retry_dead"), {**filters, "limit": limit}).fetchall()
    return [(int(r["old_id"]), None if r["new_id"] is None else int(r["new_id"])) for r in rows]
