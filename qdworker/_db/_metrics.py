"""The statements of metrics (``sql/queries/metrics.sql``): writing a supervisor's throughput
and reading the cluster figures that ``/metrics`` and ``qdworker status`` show.

Each function takes a psycopg connection (run it through a
:class:`~qdworker._db.connection.Link`) and lets psycopg's errors propagate (the link
translates them). :func:`cluster_figures` reads everything in one repeatable-read
transaction, so its parts agree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg

from . import statements

Raw = psycopg.Connection[Any]

#: Most workers and cron schedules one read returns (a scrape stays small).
MAX_ROWS: Final = 1000


@dataclass(frozen=True)
class ClusterFigures:
    """What Postgres says about the whole cluster (every supervisor sees the same)."""

    queues: list[dict[str, Any]]  # queue, due, scheduled, running, oldest_due_seconds
    enqueued: list[dict[str, Any]]  # queue, type, jobs
    workers: list[dict[str, Any]]  # see worker_figures in metrics.sql
    cron: list[dict[str, Any]]  # type, tag, cron_schedule, next_due, running, lag_seconds


def add_throughput(raw: Raw, supervisor: str, rows_json: str) -> None:
    """Add one flush (a JSON array, see ``add_throughput``) to ``supervisor``'s rows."""
    raw.execute(statements.get("add_throughput"), {"supervisor": supervisor, "rows": rows_json})


def forget_throughput(raw: Raw, *, older_than_seconds: float) -> int:
    """Delete throughput buckets older than ``older_than_seconds``; returns how many."""
    cur = raw.execute(
        statements.get("forget_throughput"), {"older_than_seconds": older_than_seconds}
    )
    return cur.rowcount


def _all(raw: Raw, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [dict(row) for row in raw.execute(statements.get(name), params).fetchall()]


def cluster_figures(raw: Raw) -> ClusterFigures:
    """Queues, enqueued counts, workers and cron schedules, as of one snapshot."""
    limit = {"limit": MAX_ROWS}
    with raw.transaction():
        raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return ClusterFigures(
            queues=_all(raw, "queue_figures"),
            enqueued=_all(raw, "enqueued_counts"),
            workers=_all(raw, "worker_figures", limit),
            cron=_all(raw, "cron_figures", limit),
        )
