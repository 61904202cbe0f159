"""Queue limits across two supervisors of two workers each, measured from what the handlers
recorded (``test_spans``, database clock) and from ``worker_jobs.started``: cluster-wide
concurrency (reached, never exceeded), per-key concurrency, rate limits (rate and bursts),
fair share between keys (and a key alone gets everything)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
from procs import wait_for
from psycopg.rows import dict_row
from spans import create_spans_table, max_overlap, spans, two_supervisors

UNFINISHED = (
    "SELECT count(*) AS n FROM worker_jobs WHERE finished IS NULL AND cron_schedule IS NULL"
)


def _sql(db_url: str, *statements: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _rows(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()


def _drained(db_url: str, timeout: float) -> None:
    wait_for(db_url, UNFINISHED, lambda rows: rows[0]["n"] == 0, timeout=timeout)


def test_queue_concurrency_is_reached_and_never_exceeded(db_url: str) -> None:
    create_spans_table(db_url)
    _sql(
        db_url,
        "INSERT INTO worker_queues (name, concurrency) VALUES ('reports', 3)",
        "INSERT INTO worker_jobs (type, queue, data) "
        "SELECT 'span', 'reports', '{\"seconds\": 0.05}' FROM generate_series(1, 500)",
        # Work of an unlimited queue beside it takes the other slots.
        "INSERT INTO worker_jobs (type, data) "
        "SELECT 'span', '{\"seconds\": 0.05}' FROM generate_series(1, 500)",
    )
    with two_supervisors(db_url, QDWORKER_CONCURRENCY="4"):
        _drained(db_url, timeout=120)
    limited = spans(db_url, "queue = 'reports'")
    other = spans(db_url, "queue = 'default'")
    assert len(limited) == 500 and all(r["ended"] for r in limited)
    overlap = max_overlap((r["started"], r["ended"]) for r in limited)
    print(f"\nqueue concurrency 3: at most {overlap} of 500 jobs ran at once")
    assert overlap == 3
    assert max_overlap((r["started"], r["ended"]) for r in other) > 3  # unlimited: not held
    failed = "SELECT count(*) AS n FROM worker_jobs WHERE success IS NOT TRUE AND type = 'span'"
    assert _rows(db_url, failed) == [{"n": 0}]


def test_key_concurrency_is_per_key(db_url: str) -> None:
    create_spans_table(db_url)
    _sql(
        db_url,
        "INSERT INTO worker_queues (name, key_concurrency) VALUES ('tenants', 2)",
        "INSERT INTO worker_jobs (type, queue, concurrency_key, data) "
        "SELECT 'span', 'tenants', 'tenant:' || (i % 5), '{\"seconds\": 0.05}' "
        "FROM generate_series(1, 300) AS i",
    )
    with two_supervisors(db_url, QDWORKER_CONCURRENCY="4"):
        _drained(db_url, timeout=120)
    runs = spans(db_url)
    assert len(runs) == 300
    per_key = {
        key: max_overlap((r["started"], r["ended"]) for r in runs if r["key"] == key)
        for key in {r["key"] for r in runs}
    }
    print(f"\nper-key concurrency 2: most at once per key {per_key}")
    assert sorted(per_key.values()) == [2] * 5
    assert max_overlap((r["started"], r["ended"]) for r in runs) > 2  # keys run side by side


def test_rate_limit_holds_its_rate_without_bursts(db_url: str) -> None:
    limit, period = 10, timedelta(seconds=1)
    _sql(
        db_url,
        f"INSERT INTO worker_queues (name, rate_limit, rate_period_ms) VALUES ('emails', {limit}, 1000)",
        "INSERT INTO worker_jobs (type, queue) SELECT 'noop', 'emails' FROM generate_series(1, 400)",
    )
    with two_supervisors(db_url, QDWORKER_POLL_INTERVAL="30"):
        wait_for(
            db_url,
            "SELECT max(started) - min(started) AS span FROM worker_jobs WHERE started IS NOT NULL",
            lambda rows: rows[0]["span"] is not None and rows[0]["span"] >= timedelta(seconds=21),
            timeout=60,
        )
    starts = [r["started"] for r in _rows(db_url, "SELECT started FROM worker_jobs "
                                                   "WHERE started IS NOT NULL ORDER BY started")]  # fmt: skip
    first = starts[0]
    in_20s = sum(1 for s in starts if s < first + timedelta(seconds=20))
    burst = max(sum(1 for t in starts if s <= t < s + period) for s in starts)
    print(f"\nrate limit {limit}/s: {in_20s} starts in the first 20 s "
          f"({in_20s / 20:.2f}/s), at most {burst} in any 1 s window")  # fmt: skip
    assert abs(in_20s - 20 * limit) <= 2 * limit  # within 10 %
    assert burst <= limit


def test_fair_share_lets_a_small_key_through_a_large_backlog(db_url: str) -> None:
    create_spans_table(db_url)
    _sql(
        db_url,
        "INSERT INTO worker_queues (name, fair) VALUES ('shared', true)",
        "INSERT INTO worker_jobs (type, queue, concurrency_key, data) "
        "SELECT 'span', 'shared', 'big', '{\"seconds\": 0.01}' FROM generate_series(1, 10000)",
    )
    with two_supervisors(db_url, QDWORKER_CONCURRENCY="4"):
        wait_for(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE finished IS NOT NULL",
                 lambda rows: rows[0]["n"] >= 1000, timeout=60)  # fmt: skip
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
            [small_at] = conn.execute(
                "INSERT INTO worker_jobs (type, queue, concurrency_key, data) "
                "SELECT 'span', 'shared', 'small', '{\"seconds\": 0.01}' "
                "FROM generate_series(1, 10) RETURNING created_at"
            ).fetchall()[:1]
        wait_for(db_url, "SELECT count(*) AS n FROM worker_jobs WHERE concurrency_key = 'small' "
                 "AND finished IS NULL", lambda rows: rows[0]["n"] == 0, timeout=60)  # fmt: skip
        [row] = _rows(
            db_url,
            "SELECT (SELECT max(started) FROM worker_jobs WHERE concurrency_key = 'small') AS last,"
            " (SELECT count(*) FROM worker_jobs WHERE concurrency_key = 'big' AND started IS NULL)"
            " AS big_waiting",
        )
        _drained(db_url, timeout=120)
    [between] = _rows(
        db_url,
        "SELECT count(*) AS n FROM worker_jobs WHERE concurrency_key = 'big' "
        "AND started > %s AND started <= %s",
        (small_at["created_at"], row["last"]),
    )
    print(f"\nfair share: the small key's 10 jobs all started while the big key started "
          f"{between['n']} (of {row['big_waiting']} still waiting)")  # fmt: skip
    assert row["big_waiting"] > 1000  # the big backlog was still there
    assert between["n"] < 1000  # 10 % of the backlog


def test_fair_share_gives_a_key_alone_every_slot(db_url: str) -> None:
    create_spans_table(db_url)
    _sql(
        db_url,
        "INSERT INTO worker_queues (name, fair) VALUES ('shared', true)",
        "INSERT INTO worker_jobs (type, queue, concurrency_key, data) "
        "SELECT 'span', 'shared', 'only', '{\"seconds\": 0.2}' FROM generate_series(1, 200)",
    )
    with two_supervisors(db_url, QDWORKER_CONCURRENCY="4"):
        _drained(db_url, timeout=120)
    overlap = max_overlap((r["started"], r["ended"]) for r in spans(db_url))
    print(f"\nfair share, one key alone: {overlap} of 16 slots used at once")
    assert overlap == 16  # work-conserving
