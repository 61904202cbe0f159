"""What fan-in costs: finishing parents that have a dependent against finishing jobs without
one (the same UPDATE the finish statement runs, in batches), and inserting a dependent of
many parents. Prints the figures (run with ``-s``); the bounds are loose (shared machines),
but an O(n) rescan per parent (seconds at this size) would fail them."""

from __future__ import annotations

import time
from typing import Any

import psycopg

PARENTS = 5_000
BATCH = 100
SMALL_FAN_IN = 10
#: Loose bound on the extra cost of finishing one parent (shared, busy test machines).
MAX_OVERHEAD_MS_PER_PARENT = 2.0


def _ids(sql: psycopg.Connection[Any], n: int) -> list[int]:
    rows = sql.execute(
        "INSERT INTO worker_jobs (type) SELECT 'noop' FROM generate_series(1, %s) RETURNING id",
        (n,),
    ).fetchall()
    return sorted(r["id"] for r in rows)


def _finish_all(sql: psycopg.Connection[Any], ids: list[int]) -> float:
    """Seconds to finish ``ids`` successfully in batches, as workers do."""
    began = time.perf_counter()
    for at in range(0, len(ids), BATCH):
        sql.execute(
            "UPDATE worker_jobs SET started = now(), finished = now(), success = true, "
            "result = '{\"v\": 1}' WHERE id = ANY(%s)",
            (ids[at : at + BATCH],),
        )
    return time.perf_counter() - began


def test_fan_in_overhead_per_parent(sql: Any) -> None:
    plain = _ids(sql, PARENTS)
    parents = _ids(sql, PARENTS)
    began = time.perf_counter()
    child = sql.execute(
        "INSERT INTO worker_jobs (type, depends_on) VALUES ('merge', %s) RETURNING id",
        (parents,),
    ).fetchone()["id"]
    insert_s = time.perf_counter() - began
    plain_s = _finish_all(sql, plain)
    parents_s = _finish_all(sql, parents)
    [row] = sql.execute(
        "SELECT waiting_on, due <= now() AS due FROM worker_jobs WHERE id = %s", (child,)
    ).fetchall()
    assert row == {"waiting_on": 0, "due": True}
    overhead_ms = (parents_s - plain_s) * 1000 / PARENTS
    print(
        f"\nfan-in of {PARENTS}: insert of the dependent {insert_s * 1000:.0f} ms "
        f"({insert_s * 1e6 / PARENTS:.0f} us/parent); finishing in batches of {BATCH}: "
        f"{plain_s * 1000:.0f} ms without a dependent, {parents_s * 1000:.0f} ms with one "
        f"({overhead_ms * 1000:.0f} us more per parent)"
    )
    assert overhead_ms < MAX_OVERHEAD_MS_PER_PARENT


def test_fan_in_overhead_per_parent_with_small_dependents(sql: Any) -> None:
    """Many dependents of 10 parents each (the dependent's row stays small)."""
    plain = _ids(sql, PARENTS)
    parents = _ids(sql, PARENTS)
    for at in range(0, PARENTS, SMALL_FAN_IN):
        sql.execute(
            "INSERT INTO worker_jobs (type, depends_on) VALUES ('merge', %s)",
            (parents[at : at + SMALL_FAN_IN],),
        )
    plain_s = _finish_all(sql, plain)
    parents_s = _finish_all(sql, parents)
    [row] = sql.execute(
        "SELECT count(*) AS n FROM worker_jobs WHERE type = 'merge' AND waiting_on = 0 "
        "AND due <= now()"
    ).fetchall()
    assert row["n"] == PARENTS // SMALL_FAN_IN
    overhead_ms = (parents_s - plain_s) * 1000 / PARENTS
    print(
        f"\n{PARENTS // SMALL_FAN_IN} dependents of {SMALL_FAN_IN} parents: finishing "
        f"{plain_s * 1000:.0f} ms without, {parents_s * 1000:.0f} ms with "
        f"({overhead_ms * 1000:.0f} us more per parent)"
    )
    assert overhead_ms < MAX_OVERHEAD_MS_PER_PARENT
