"""What a ``/metrics`` scrape costs with 1,000,000 rows in ``worker_jobs``.

    .venv/bin/python bench/metrics_scrape.py [--rows 1000000] [--samples 20]

Uses ``DATABASE_URL``'s server or an embedded Postgres in a temporary data dir (scratch
database ``qdworker_bench``, dropped at the end). Two shapes of the same size:

* ``history``: the rows are finished jobs (what a busy cluster keeps), plus 1,000 due,
  1,000 scheduled, 100 running and 10 cron chains;
* ``backlog``: the rows are pending jobs due now (the worst case for the queue figures).

For each it prints the time of the cluster read alone (``cluster_figures``: the four
statements in one read-only transaction, every sample a fresh read) and of whole HTTP scrapes
of a supervisor (``serve``, no workers): cold (the cluster figures read again, 2.1 s apart)
and warm (cached). Figures go to docs/benchmarks.md, section "Metrics at 1,000,000 rows".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(os.environ.get("QDWORKER_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from qdworker import Config, Manager, serve  # noqa: E402
from qdworker._benchmark._scratch import ScratchDatabase, query  # noqa: E402
from qdworker._db import _metrics as metrics_store  # noqa: E402
from qdworker._db.connect import DbOptions  # noqa: E402
from qdworker._db.connection import Link  # noqa: E402

#: A cache miss: the scrape after this pause reads Postgres again.
COLD_PAUSE_SECONDS = 2.1
COLD_SCRAPES = 5


def fill(url: str, rows: int, shape: str) -> None:
    """``rows`` jobs of ``shape`` plus the few open ones, then VACUUM ANALYZE."""
    finished = "now() - interval '1 hour', now() - interval '1 hour', true"
    state = finished if shape == "history" else "NULL, NULL, NULL"
    query(url, f"INSERT INTO worker_jobs (type, queue, data, started, finished, success) "
               f"SELECT 't' || (g % 10), 'q' || (g % 5), '{{}}', {state} "
               f"FROM generate_series(1, {rows}) AS g")  # fmt: skip
    query(url, "INSERT INTO worker_jobs (type, queue, data) SELECT 't' || (g % 10), "
               "'q' || (g % 5), '{}' FROM generate_series(1, 1000) AS g")  # fmt: skip
    query(url, "INSERT INTO worker_jobs (type, queue, data, due) SELECT 't1', 'q1', '{}', "
               "now() + interval '1 hour' FROM generate_series(1, 1000)")  # fmt: skip
    query(url, "INSERT INTO worker_jobs (type, queue, data, started, lease_owner, "
               "lease_expires_at) SELECT 't2', 'q2', '{}', now(), 'w', now() + interval '1 h' "
               "FROM generate_series(1, 100)")  # fmt: skip
    query(url, "INSERT INTO worker_jobs (type, tag, data, cron_schedule, due) "
               "SELECT 'cron' || g, 'cron:' || g, '{}', '* * * * *', now() - interval '3 s' "
               "FROM generate_series(1, 10) AS g")  # fmt: skip
    query(url, "VACUUM ANALYZE worker_jobs")


async def time_cluster_reads(url: str, samples: int) -> list[float]:
    async with Link(url, "bench", DbOptions()) as link:
        await link.run(metrics_store.cluster_figures)  # connect, plan
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            await link.run(metrics_store.cluster_figures)
            times.append((time.perf_counter() - t0) * 1000)
    return times


async def time_scrapes(url: str, samples: int) -> tuple[list[float], list[float], int]:
    config = Config(database_url=url, worker_count=0, ws_enabled=False, http_port=0)
    cold, warm, size = [], [], 0
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(serve, config)
        base = f"http://127.0.0.1:{manager.http_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            for _ in range(COLD_SCRAPES):
                await trio.sleep(COLD_PAUSE_SECONDS)
                t0 = time.perf_counter()
                response = await client.get("/metrics")
                cold.append((time.perf_counter() - t0) * 1000)
                size = len(response.content)
            for _ in range(samples):
                t0 = time.perf_counter()
                await client.get("/metrics")
                warm.append((time.perf_counter() - t0) * 1000)
        await manager.shutdown()
    return cold, warm, size


def _line(label: str, times: list[float]) -> str:
    return (f"{label:<28} median {statistics.median(times):7.1f} ms  max {max(times):7.1f} ms"
            f"  (n={len(times)})")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    db = ScratchDatabase(os.environ.get("DATABASE_URL"))
    await trio.to_thread.run_sync(db.start)
    try:
        print(f"server: Postgres {db.version}, {db.description}")
        for shape in ("history", "backlog"):
            url = await db.afresh()
            t0 = time.perf_counter()
            await trio.to_thread.run_sync(fill, url, args.rows, shape)
            print(f"{shape}: {args.rows:,} rows filled in {time.perf_counter() - t0:.0f} s")
            print(_line("  cluster_figures (DB)", await time_cluster_reads(url, args.samples)))
            cold, warm, size = await time_scrapes(url, args.samples)
            print(_line("  GET /metrics, cold", cold))
            print(_line("  GET /metrics, cached", warm))
            print(f"  response: {size:,} bytes")
    finally:
        await trio.to_thread.run_sync(db.close)


if __name__ == "__main__":
    trio.run(main)
