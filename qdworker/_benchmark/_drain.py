"""``drain``: how fast a freshly started supervisor empties a full queue.

N no-op jobs are bulk-inserted (one ``submit_jobs``), then ``ANALYZE worker_jobs; CHECKPOINT``,
then ``python -m qdworker`` is started (cold: start-up included in the CPU figures). Timed by
the database: ``min(started)`` -> ``max(finished)``; the start-up (launch -> first claim) is
reported apart. CPU seconds of the worker children, the supervisor and every Postgres process
are read from ``/proc`` once the queue is seen empty, RSS of the workers likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import procs
from ._figures import Figure, ms, per_1k, rounded, rss_mb
from ._run import Run, exit_notes
from ._scratch import Window, aquery, submit_noops, wait_drained, window

_TIMING = "DB min(started) -> max(finished); start-up = launch -> first claim"


@dataclass
class _Cold:
    """What a cold-started supervisor used until the queue was seen empty."""

    launched: float  # time.time() just before the launch
    seen_drained: float  # time.time() when the queue was seen empty
    workers_cpu_s: float | None
    supervisor_cpu_s: float | None
    postgres_cpu_s: float | None
    worker_rss: list[int | None]
    status: int | None  # the supervisor's exit status


async def drain(run: Run, n: int, worker_count: int) -> Figure:
    url = await run.db.afresh()
    insert_s = await submit_noops(url, n)
    await aquery(url, "ANALYZE worker_jobs")
    await aquery(url, "CHECKPOINT")
    settings: dict[str, str] = {}
    if worker_count != run.defaults.worker_count:
        settings["WORKER_COUNT"] = str(worker_count)
    cold = await cold_drain(run, url, f"drain-{worker_count}", settings)
    win = await window(url, exclude_warmup=False)
    figure = Figure(
        "drain",
        n,
        win.seconds,
        n / win.seconds,
        settings=run.settings(worker_count=worker_count),
        extra=drain_extra(n, insert_s, cold, win),
    )
    failed = [f"{win.failed} jobs failed"] if win.failed else []
    figure.add_notes([*win.claim_notes(), *failed, *exit_notes(cold.status)])
    return figure


async def cold_drain(run: Run, url: str, name: str, settings: dict[str, str]) -> _Cold:
    """Start a supervisor on the full queue, wait until it is empty, read the CPU used, stop."""
    sup = run.supervisor(name, **settings)
    pg0 = procs.snapshot(run.db.pg_pids())
    proc = sup.start()
    try:
        seen = await wait_drained(url, run.timeout_s, proc)
        workers = sup.workers()
        worker_cpu = sum(procs.snapshot(workers).values()) if workers else None
        pg_cpu = procs.used(pg0, procs.snapshot(run.db.pg_pids())) if run.db.postmaster else None
        sup_cpu = procs.cpu_seconds(sup.pid)
        rss = [procs.rss_bytes(pid) for pid in workers]
    finally:
        status = sup.stop()
    return _Cold(sup.launched, seen, worker_cpu, sup_cpu, pg_cpu, rss, status)


def drain_extra(n: int, insert_s: float, cold: _Cold, win: Window) -> dict[str, Any]:
    return {
        "startup_s": rounded(win.first_started - cold.launched, 3),
        "first_handler_after_claim_ms": rounded((win.first_handler - win.first_started) * 1000, 2),
        "bulk_insert_s": rounded(insert_s, 3),
        "seen_drained_after_last_finish_s": rounded(cold.seen_drained - win.last_finished, 3),
        "cpu_s": {
            "workers_incl_startup": rounded(cold.workers_cpu_s, 2),
            "supervisor_incl_startup": rounded(cold.supervisor_cpu_s, 2),
            "postgres": rounded(cold.postgres_cpu_s, 2),
        },
        "postgres_cpu_s_per_1k": per_1k(cold.postgres_cpu_s, n),
        "worker_rss_mb": rss_mb(cold.worker_rss),
        "timing": _TIMING,
    }


def notes(figure: Figure) -> list[str]:
    x = figure.extra
    return [
        f"start-up {x.get('startup_s')} s",
        f"PG CPU {ms(x.get('postgres_cpu_s_per_1k'))} ms/1k (incl. start-up)",
    ]
