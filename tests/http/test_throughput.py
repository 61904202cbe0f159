"""The supervisor's side of the tallies, against real Postgres: sums, the upsert that adds to
a bucket (histograms entry by entry), malformed entries, a flush that fails keeps its rows, and
the maintenance round deletes buckets older than 25 hours."""

from __future__ import annotations

from typing import Any

import psycopg
import trio
from psycopg.rows import dict_row
from waiting import wait_until_async

from qdworker._db.connect import DbOptions
from qdworker._db.connection import Link
from qdworker._protocol import PICKUP_BOUNDS_MS, RUN_BOUNDS_MS
from qdworker._supervisor import maintenance
from qdworker._supervisor._throughput import Throughput
from qdworker.errors import DatabaseError

PICKUPS = len(PICKUP_BOUNDS_MS) + 1


def entry(queue: str = "q", job_type: str = "t", **counts: Any) -> dict[str, Any]:
    pickup = [0] * PICKUPS
    pickup[1] = counts.get("started", 0)
    return {"queue": queue, "type": job_type, "run_hist": [0] * (len(RUN_BOUNDS_MS) + 1),
            "pickup_hist": pickup, **counts}  # fmt: skip


def rows(db_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT supervisor, queue, type, started, succeeded, failed, run_ms, pickup_ms_hist "
            "FROM qdworker_throughput ORDER BY queue"
        ).fetchall()


async def test_flushes_add_up_in_one_bucket(db_url: str) -> None:
    throughput = Throughput("sup-a")
    throughput.add([entry(started=2, succeeded=1, failed=1, timed_out=1, run_ms=30)])
    throughput.add([entry(started=1, cancelled=1, retried=1, lost=1), "junk", {"queue": 1}])
    throughput.add("not a list")
    async with Link(db_url, "test", DbOptions()) as link:
        await throughput.flush(link)
        throughput.add([entry(started=4, succeeded=4, run_ms=10), entry("r", started=1)])
        await throughput.flush(link)
        await throughput.flush(link)  # nothing pending: no statement, no change
    found = rows(db_url)
    sums = [(r["queue"], r["started"], r["succeeded"], r["failed"], r["run_ms"]) for r in found]
    assert sums == [("q", 7, 5, 3, 40), ("r", 1, 0, 0, 0)]
    assert found[0]["pickup_ms_hist"] == [0, 7] + [0] * (PICKUPS - 2)
    assert {r["supervisor"] for r in found} == {"sup-a"}
    totals = throughput.totals()[("q", "t")]
    assert (totals["started"], totals["retried"], totals["lost"], totals["timed_out"]) == (
        7,
        1,
        1,
        1,
    )


async def test_a_failed_flush_keeps_its_rows(db_url: str) -> None:
    throughput = Throughput("sup-b")
    throughput.add([entry(started=3, succeeded=3)])
    broken = Link("postgresql://nobody@127.0.0.1:1/none", "test", DbOptions(1.0), persistent=False)
    try:
        await throughput.flush(broken)
    except DatabaseError:
        pass
    else:
        raise AssertionError("a flush to an unreachable server must raise")
    async with Link(db_url, "test", DbOptions()) as link:
        await throughput.flush(link)
    assert [(r["started"], r["succeeded"]) for r in rows(db_url)] == [(3, 3)]


async def test_maintenance_deletes_buckets_older_than_25_hours(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO qdworker_throughput (bucket, supervisor, queue, type, started) VALUES "
            "(now() - interval '26 hours', 's', 'old', 't', 1), "
            "(now() - interval '24 hours', 's', 'kept', 't', 1)"
        )
    with trio.move_on_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: maintenance.run_maintenance(
                db_url, DbOptions(), unknown_type_timeout=3600, task_status=task_status))  # fmt: skip
            await wait_until_async(lambda: [r["queue"] for r in rows(db_url)] == ["kept"])
            nursery.cancel_scope.cancel()
    assert [r["queue"] for r in rows(db_url)] == ["kept"]
