"""The dashboard's queries at scale: fills worker_jobs with ROWS jobs (default 1,000,000), then
times the jobs list (first page, filtered pages, a deep keyset page), the bulk-action count,
the job page and the other pages' statements, and prints a Markdown table
(docs/benchmarks.md, "Dashboard at 1,000,000 rows").

    python tools/dashboard_bench.py [--rows N] [--repeat R] [--index-cost]

It runs on ``QDWORKER_TEST_DATABASE_URL``'s server, else an embedded Postgres of its own
(data in /tmp/qdworker-dash-bench-pg), in a database it creates and drops. ``--index-cost``
also measures what the partial index on ``rescheduled_from_job`` of migration
``sql/migrations/0011_dashboard.sql`` costs inserts and saves the job page.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from qdworker._http import _dash_store as store
from qdworker._http._dash_store import Filters
from qdworker.testing import TestDatabases
from qdworker.testing._databases import test_server

DATA_DIR = Path("/tmp/qdworker-dash-bench-pg")
ROOT = Path(__file__).resolve().parent.parent
MIGRATION_0011 = ROOT / "sql" / "migrations" / "0011_dashboard.sql"
CHUNK = 100_000

FILL = """
INSERT INTO worker_jobs (type, queue, user_id, data, due, started, finished, success, result,
                         dead_at, concurrency_key)
SELECT CASE WHEN i %% 1000 = 0 THEN 'rare' ELSE 'type' || (i %% 20) END,
       CASE WHEN i %% 20 = 0 THEN 'reports' WHEN i %% 7 = 0 THEN 'mail' ELSE 'default' END,
       i %% 5000,
       jsonb_build_object('n', i, 'email', 'user' || (i %% 5000) || '@example.com'),
       now(),
       CASE WHEN i %% 100 < 99 THEN now() END,
       CASE WHEN i %% 100 < 98 THEN now() END,
       CASE WHEN i %% 100 < 98 THEN i %% 50 <> 7 END,
       CASE WHEN i %% 100 >= 98 THEN NULL
            WHEN i %% 50 = 7 THEN jsonb_build_object(
                'error', 'connection refused: smtp' || (i %% 3), 'error_type', 'ConnectionError')
            ELSE '{"ok": true}'::jsonb END,
       CASE WHEN i %% 50 = 7 THEN now() END,
       CASE WHEN i %% 3 = 0 THEN 'tenant:' || (i %% 97) END
  FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS i
"""


def fill(conn: psycopg.Connection[Any], rows: int) -> float:
    began = time.perf_counter()
    for start in range(1, rows + 1, CHUNK):
        conn.execute(FILL, {"start": start, "stop": min(start + CHUNK - 1, rows)})
    # A day and a half of history, a retry chain every hundredth job (to the job before it).
    conn.execute("UPDATE worker_jobs SET created_at = now() - (%s - id) * interval '130 ms',"
                 " rescheduled_from_job = CASE WHEN id %% 100 = 1 AND id > 1 THEN id - 1 END",
                 [rows])  # fmt: skip
    conn.execute("VACUUM ANALYZE worker_jobs")
    return time.perf_counter() - began


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(median ms, max ms, last result) of ``repeat`` runs after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), max(times), result


def cases(conn: psycopg.Connection[Any], rows: int) -> dict[str, Callable[[], Any]]:
    row = conn.execute("SELECT created_at FROM worker_jobs WHERE id = %s", [rows // 2]).fetchone()
    assert row is not None
    middle = row["created_at"]
    hour = {"since": middle, "until": middle + (middle - middle).__class__(hours=1)}
    chained = (rows // 200) * 100 + 1
    bulk = Filters(type="type3")

    def page(before: int | None = None, **filters: Any) -> Callable[[], Any]:
        return lambda: store.jobs_page(conn, Filters(**filters), before, 50)

    return {
        "jobs list, first page (50 rows)": page(),
        "first page, state = dead (2 %)": page(state="dead"),
        "first page, type = rare (0.1 %)": page(type="rare"),
        "first page, queue + user (1 in 5,000)": page(queue="reports", user_id=40),
        "first page, text in data ('user4242@')": page(text="user4242@"),
        "first page, one hour of created_at": page(**hour),
        "first page, type matching nothing (whole table)": page(type="nope"),
        f"deep keyset page (before id {rows // 100:,})": page(before=rows // 100),
        "deep keyset page, state = dead": page(before=rows // 100, state="dead"),
        "count for a bulk action (capped at 10,001)": lambda: store.count(conn, bulk),
        "job page: the row": lambda: store.job(conn, chained),
        "job page: its chain of attempts": lambda: store.chain(conn, chained),
        "failures: dead jobs grouped": lambda: store.named(conn, "dash_failures", limit=200),
        "queues (list_queues)": lambda: store.named(conn, "list_queues"),
        "cron": lambda: store.named(conn, "dash_cron", limit=200),
    }


def index_cost(conn: psycopg.Connection[Any], repeat: int) -> list[str]:
    """Inserts (plain, and retries that set rescheduled_from_job) with and without migration
    0011's partial index, interleaved (index off, on, on, off, ...) so that the load of
    the machine weighs on both alike; each insert rolled back."""
    insert = ("INSERT INTO worker_jobs (type, rescheduled_from_job) SELECT 'x',"
              " CASE WHEN %s THEN i END FROM generate_series(1, 20000) AS i")  # fmt: skip
    times: dict[tuple[bool, bool], list[float]] = {}
    for round_ in range(repeat):
        for with_index in (False, True) if round_ % 2 == 0 else (True, False):
            conn.execute("DROP INDEX IF EXISTS worker_jobs_chain_idx")
            if with_index:
                conn.execute(MIGRATION_0011.read_text(encoding="utf-8"))
            for linked in (False, True):
                began = time.perf_counter()
                with conn.transaction(force_rollback=True):
                    conn.execute(insert, [linked])
                elapsed = (time.perf_counter() - began) * 1000
                times.setdefault((with_index, linked), []).append(elapsed)
    conn.execute("DROP INDEX IF EXISTS worker_jobs_chain_idx")
    conn.execute(MIGRATION_0011.read_text(encoding="utf-8"))
    lines = []
    for (with_index, linked), found in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        what = "retries (rescheduled_from_job set)" if linked else "plain jobs"
        lines.append(f"| 20,000 {what}, index {'on' if with_index else 'off'} "
                     f"| {statistics.median(found):.0f} ms |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--index-cost", action="store_true")
    args = parser.parse_args()
    with test_server(DATA_DIR) as server_url:
        databases = TestDatabases(server_url)
        databases.create_template()
        try:
            with (
                databases.clone("qdworker_dash_bench") as url,
                psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn,
            ):
                print(f"filled {args.rows:,} rows in {fill(conn, args.rows):.0f} s")
                print("| Statement | median | max |\n|---|---:|---:|")
                for name, fn in cases(conn, args.rows).items():
                    median, most, _ = timed(fn, args.repeat)
                    print(f"| {name} | {median:.1f} ms | {most:.1f} ms |")
                if args.index_cost:
                    conn.execute("DROP INDEX IF EXISTS worker_jobs_chain_idx")
                    chain = cases(conn, args.rows)["job page: its chain of attempts"]
                    median, most, _ = timed(chain, args.repeat)
                    print(f"\nchain without the index: {median:.1f} ms median, {most:.1f} ms max")
                    print("\n| Insert | median |\n|---|---:|")
                    print("\n".join(index_cost(conn, args.repeat)))
                    chain = cases(conn, args.rows)["job page: its chain of attempts"]
                    median, most, _ = timed(chain, args.repeat)
                    print(f"\nchain with migration 0011's index: {median:.1f} ms median, "
                          f"{most:.1f} ms max")  # fmt: skip
        finally:
            databases.drop_template()


if __name__ == "__main__":
    main()
