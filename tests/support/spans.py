"""What ran when, for the queue tests: handler spans (the ``span`` job type records them in
``test_spans``, database clock) and the most of them that overlapped."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from procs import running, start_supervisor, stop
from psycopg.rows import dict_row

__all__ = ["create_spans_table", "max_overlap", "spans", "two_supervisors"]


def create_spans_table(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE test_spans (job_id bigint, claims integer, queue text, key text, "
            "started timestamptz NOT NULL, ended timestamptz, PRIMARY KEY (job_id, claims))"
        )


def spans(db_url: str, where: str = "true", params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute(
            f"SELECT * FROM test_spans WHERE {where} ORDER BY started", params
        ).fetchall()


def max_overlap(intervals: Iterable[tuple[datetime, datetime]]) -> int:
    """The most intervals that held at one instant (an end and a start at the same instant
    do not overlap)."""
    pairs = list(intervals)
    events = sorted([(start, 1) for start, _ in pairs] + [(end, -1) for _, end in pairs])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@contextmanager
def two_supervisors(db_url: str, **settings: str) -> Iterator[None]:
    """Two supervisors of two workers each on ``db_url``; stopped cleanly at the end."""
    env = {"WORKER_COUNT": "2", **settings}
    with (
        running(start_supervisor(db_url, **env)) as a,
        running(start_supervisor(db_url, **env)) as b,
    ):
        yield
        assert stop(a) == 0 and stop(b) == 0
