"""Every statement of the job's path, as a function: the worker's, the client's, the
supervisor's. The SQL itself lives in ``sql/queries/*.sql`` (see :mod:`.statements`); here it
gets its parameters and its rows become Python values, ``Job`` rows by column name.

Each function takes a psycopg connection and blocks: call it through
:meth:`.connection.Link.run` or :meth:`.connection.Connection.run` (a worker thread). Errors
are psycopg's; the caller's connection layer translates them (:func:`.connect.translate`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from psycopg.rows import RowMaker

from .._model import COLUMNS, Job
from .._registry import CronJob
from .._schedule import cron
from . import statements

Raw = psycopg.Connection[Any]


@dataclass(frozen=True, slots=True)
class Claimed:
    job: Job
    lost: bool  # the previous run of this row was lost with its worker


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


def _claimed_row(cursor: Any) -> RowMaker[Claimed]:
    job, extra = _positions(cursor)
    lost = extra["lost"]

    def make(values: Sequence[Any]) -> Claimed:
        return Claimed(Job(*[values[i] for i in job]), bool(values[lost]))

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


def _claim_params(
    limit: int, owner: str, lease_seconds: float, types: Sequence[str], **more: Any
) -> dict[str, Any]:
    return {"limit": limit, "owner": owner, "lease_seconds": lease_seconds,
            "types": list(types), **more}  # fmt: skip


def claim(
    raw: Raw,
    *,
    limit: int,
    owner: str,
    lease_seconds: float,
    types: Sequence[str],
    rescue: bool,
) -> list[Claimed]:
    params = _claim_params(limit, owner, lease_seconds, types, rescue=rescue)
    return cast(list[Claimed], _rows(raw, "claim", params, _claimed_row))


def claim_next(
    raw: Raw,
    *,
    limit: int,
    owner: str,
    lease_seconds: float,
    types: Sequence[str],
    after: tuple[datetime, int],
) -> list[Claimed]:
    """The claim's fast path: due pending jobs after ``after`` (due, id) only."""
    params = _claim_params(limit, owner, lease_seconds, types, after_due=after[0],
                           after_id=after[1])  # fmt: skip
    return cast(list[Claimed], _rows(raw, "claim_next", params, _claimed_row))


def next_wakeup(raw: Raw, *, owner: str, types: Sequence[str]) -> tuple[float | None, float]:
    """(seconds until the next pending job of ``types`` is due or a foreign lease expires, or
    None; the database clock as epoch seconds)."""
    row = _one(raw, "next_wakeup", {"owner": owner, "types": list(types)})
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
) -> list[Renewal]:
    """Register the worker and renew the leases of ``runs`` ((job id, claims) pairs); returns
    the runs still held. Runs missing from the answer are no longer this worker's."""
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
        },
    ).fetchall()
    return [Renewal(int(row["id"]), bool(row["cancel_requested"])) for row in rows]


def worker_exit(raw: Raw, *, owner: str, keep: Iterable[int]) -> int:
    """Release every run leased to ``owner`` but ``keep``; mark the worker stopped."""
    return int(_one(raw, "worker_exit", {"owner": owner, "keep": int_array(keep)})["n"])


def release_worker_leases(raw: Raw, worker_id: str) -> int:
    """A worker process died: end its leases now (its runs are rescued as lost runs)."""
    return int(_one(raw, "release_worker_leases", {"worker_id": worker_id})["n"])


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
