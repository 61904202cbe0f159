"""What counting enqueued jobs in the insert trigger (migration 0010) costs an INSERT.

    .venv/bin/python bench/enqueue_counter_cost.py [--rounds 7] [--n 3000]

On one scratch database (``DATABASE_URL``'s server or an embedded Postgres), switches the
statement trigger's function between its 0004 form (no counting) and its 0010 form (counts
into ``qdworker_enqueued``), interleaved round by round, and times plain autocommit INSERTs
of one row (``--n`` per round) and of 1,000 rows (``--n`` / 10 statements per round). Prints
the median per round of each form: microseconds per statement and the backend's CPU per
statement (``/proc``, when the server is local).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import psycopg
import trio

ROOT = Path(os.environ.get("QDWORKER_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from qdworker._benchmark import procs  # noqa: E402
from qdworker._benchmark._scratch import ScratchDatabase  # noqa: E402

WITHOUT = """
CREATE OR REPLACE FUNCTION qdworker_notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        INSERT INTO qdworker_job_types (type) SELECT DISTINCT type FROM inserted
        ON CONFLICT DO NOTHING;
        PERFORM pg_notify('qdworker_jobs', 'insert');
    END IF;
    RETURN NULL;
END;
$$"""


def with_counting() -> str:
    text = (ROOT / "sql" / "migrations" / "0010_metrics.sql").read_text()
    start = text.index("CREATE OR REPLACE FUNCTION qdworker_notify_insert")
    return text[start : text.index("$$;", start) + 2]


def _cpu(pid: int) -> float:
    return procs.snapshot([pid]).get(pid, 0.0)


def round_of(conn: psycopg.Connection, pid: int, rows: int, statements: int) -> tuple[float, float]:
    """Microseconds and backend CPU microseconds per statement."""
    sql = "INSERT INTO worker_jobs (type, data) SELECT 't', '{}' FROM generate_series(1, %s)"
    cpu0, t0 = _cpu(pid), time.perf_counter()
    for _ in range(statements):
        conn.execute(sql, (rows,))
    seconds, cpu = time.perf_counter() - t0, _cpu(pid) - cpu0
    return seconds / statements * 1e6, cpu / statements * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    db = ScratchDatabase(os.environ.get("DATABASE_URL"))
    db.start()
    try:
        url = trio.run(db.afresh)
        forms = {"without counting": WITHOUT, "with counting (0010)": with_counting()}
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        with psycopg.connect(url, autocommit=True) as conn:
            pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            for _ in range(args.rounds):
                for name, function in forms.items():
                    conn.execute(function)
                    for rows, statements in ((1, args.n), (1000, max(1, args.n // 10))):
                        results.setdefault((name, rows), []).append(
                            round_of(conn, pid, rows, statements)
                        )
        print(f"Postgres {db.version}, {db.description}; {args.rounds} rounds, interleaved")
        for (name, rows), samples in results.items():
            wall = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples)
            print(f"{name:<22} {rows:>5} row(s)/INSERT: {wall:8.1f} us/statement, "
                  f"backend CPU {cpu:8.1f} us/statement")  # fmt: skip
    finally:
        db.close()


if __name__ == "__main__":
    main()
