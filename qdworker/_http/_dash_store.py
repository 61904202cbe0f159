"""The dashboard's statements (``sql/queries/dashboard.sql``) as functions, and its filters.

Each function takes a psycopg connection and blocks: call it through
:meth:`~qdworker._db.connection.Link.run`. Errors are psycopg's (the link translates them).
Statements run unprepared (``prepare=False``): each is planned with its own values, so the
filters a request leaves empty cost nothing and the indexes the others need are used.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Final, cast

import psycopg
from psycopg.rows import dict_row

from .._db import statements
from .._queues import set_queue

Raw = psycopg.Connection[Any]

#: The states a filter may ask for (see ``dash_filters``).
STATES: Final = ("pending", "running", "unfinished", "succeeded", "failed", "dead", "cancelled")
#: Most jobs one bulk action touches (the confirmation counts up to this many).
BULK_LIMIT: Final = 10_000
#: How many attempts before and after a job its page shows.
CHAIN_DEPTH: Final = 50
_FILTERS_MARK: Final = "/* filters */"


@dataclass(frozen=True, slots=True)
class Filters:
    """What the jobs list and the bulk actions match; ``None``: any."""

    id: int | None = None
    state: str | None = None
    type: str | None = None
    queue: str | None = None
    user_id: int | None = None
    tag: str | None = None
    concurrency_key: str | None = None
    error_type: str | None = None
    error: str | None = None
    text: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _with_filters(name: str) -> str:
    text = statements.get(name)
    assert _FILTERS_MARK in text, name
    return text.replace(_FILTERS_MARK, f"({statements.get('dash_filters')})")


def _rows(raw: Raw, query: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    with raw.cursor(row_factory=dict_row) as cur:
        cur.execute(cast(Any, query), params, prepare=False)
        return cur.fetchall() if cur.description is not None else []


def jobs_page(raw: Raw, filters: Filters, before: int | None, size: int) -> list[dict[str, Any]]:
    """Up to ``size + 1`` summary rows below the cursor ``before``, newest first."""
    params = {**filters.params(), "before": before, "limit": size + 1}
    return _rows(raw, _with_filters("dash_jobs"), params)


def count(raw: Raw, filters: Filters, limit: int = BULK_LIMIT + 1) -> int:
    """How many jobs ``filters`` matches, counting at most ``limit``."""
    rows = _rows(raw, _with_filters("dash_count"), {**filters.params(), "limit": limit})
    return int(rows[0]["n"])


def job(raw: Raw, job_id: int) -> dict[str, Any] | None:
    """Every column of one job (``None``: no such job)."""
    rows = _rows(raw, statements.get("dash_job"), {"id": job_id})
    return rows[0] if rows else None


def chain(raw: Raw, job_id: int) -> list[dict[str, Any]]:
    """The attempts linked to ``job_id`` by ``rescheduled_from_job``, oldest first."""
    return _rows(raw, statements.get("dash_chain"), {"id": job_id, "depth": CHAIN_DEPTH})


def act(raw: Raw, action: str, filters: Filters, reason: str | None = None) -> list[dict[str, Any]]:
    """Run ``action`` (``cancel``, ``retry`` or ``delete``) on up to :data:`BULK_LIMIT` jobs
    ``filters`` matches, in one transaction; one row per job touched."""
    name = {"cancel": "dash_cancel", "retry": "dash_retry", "delete": "dash_delete"}[action]
    params = {**filters.params(), "limit": BULK_LIMIT, "reason": reason}
    with raw.transaction():
        return _rows(raw, _with_filters(name), params)


def named(raw: Raw, name: str, **params: Any) -> list[dict[str, Any]]:
    """The rows of the dashboard statement ``name`` (one without filters)."""
    return _rows(raw, statements.get(name), params)


def pause(raw: Raw, queue: str, paused: bool) -> dict[str, Any]:
    """Pause or resume ``queue`` (its settings row is created when missing)."""
    return set_queue(raw, queue, {"paused": paused})
