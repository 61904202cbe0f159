"""``cost``: what draining costs in CPU and memory, on an idle (warmed-up) supervisor.

One ``submit_jobs`` of N no-op jobs, drained; timed by the database (``min(started)`` ->
``max(finished)`` of the N jobs, the warm-up's left out). CPU is read from ``/proc`` before the
insert and once the queue is seen empty: worker processes (the supervisor's children), the
supervisor, and every child of the postmaster (backends and background writers) alive at the
end of the window; the inserting backend's CPU is reported apart. Worker RSS before and after.
With ``--long`` the drain goes on in batches of 10,000 up to ``Options.long_n`` (100,000) jobs,
the workers' RSS sampled after each batch.

:func:`measured_drain` is also the drain of ``drain_clients`` (:mod:`._drain_clients`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio

from .._client import Queue
from . import procs
from ._figures import BYTES_PER_MB, Figure, ms, per_1k, rounded, rss_mb
from ._run import Run, Session, exit_notes
from ._scratch import aquery, client_backend, noop_jobs, wait_drained, window

IDLE_BEFORE_S = 0.5  # pause between the warm-up (or the clients' connecting) and the insert
LONG_BATCH_JOBS = 10_000
_TIMING = "idle supervisor (warmed up); one submit_jobs of N; DB min(started) -> max(finished)"


async def cost(run: Run, n: int, long_n: int | None) -> Figure:
    """The ``cost`` figure; with ``long_n``, drained on up to ``long_n`` jobs (``--long``)."""
    async with run.warm_session("cost") as session:
        await trio.sleep(IDLE_BEFORE_S)
        workers = session.supervisor.workers()
        figure = await measured_drain(run, "cost", session, workers, n)
        if long_n is not None:
            figure.extra["long"] = await _long(run, session, workers, n, long_n)
    figure.add_notes(exit_notes(session.status))
    return figure


@dataclass
class _Insert:
    """The measured ``submit_jobs`` and the Postgres CPU around it."""

    seconds: float
    producer: int | None  # the inserting backend's pid
    postgres_before: dict[int, float]  # CPU seconds of the Postgres processes before it
    producer_cpu_s: float | None


async def measured_drain(
    run: Run, workload: str, session: Session, workers: list[int], n: int
) -> Figure:
    """Insert ``n`` jobs in one call, wait until drained; the CPU and RSS figures."""
    sup = session.supervisor
    assert sup.proc is not None
    rss0 = [procs.rss_bytes(pid) for pid in workers]
    w0 = procs.snapshot(workers)
    s0 = procs.cpu_seconds(sup.pid)
    insert = await _insert(run, session.url, n)
    await wait_drained(session.url, run.timeout_s, sup.proc)
    w1 = procs.snapshot(workers)
    s1 = procs.cpu_seconds(sup.pid)
    pg1 = procs.snapshot(run.db.pg_pids())
    rss1 = [procs.rss_bytes(pid) for pid in workers]
    win = await window(session.url, exclude_warmup=True)
    pg_drain = (
        procs.used(
            insert.postgres_before, pg1, exclude=[insert.producer] if insert.producer else []
        )
        if run.db.postmaster
        else None
    )
    sup_cpu = (s1 - s0) if s0 is not None and s1 is not None else None
    extra: dict[str, Any] = {
        "timing": _TIMING,
        "bulk_insert_s": rounded(insert.seconds, 3),
        "cpu_s_per_1k": {
            "workers": per_1k(procs.used(w0, w1), n),
            "supervisor": per_1k(sup_cpu, n),
            "postgres_drain": per_1k(pg_drain, n),
            "postgres_insert": per_1k(insert.producer_cpu_s, n),
        },
        "worker_rss_mb_before": rss_mb(rss0),
        "worker_rss_mb_after": rss_mb(rss1),
    }
    figure = Figure(workload, n, win.seconds, n / win.seconds, settings=run.settings(), extra=extra)
    figure.add_notes(win.claim_notes())
    return figure


async def _insert(run: Run, url: str, n: int) -> _Insert:
    async with Queue(url) as queue:
        producer = await client_backend(url)
        pg0 = procs.snapshot(run.db.pg_pids())
        t0 = time.perf_counter()
        await queue.submit_jobs(noop_jobs(n))
        seconds = time.perf_counter() - t0
        # The producer's backend ends with its connection: read its CPU now.
        producer_cpu = None
        if producer is not None and producer in pg0:
            after = procs.cpu_seconds(producer)
            producer_cpu = None if after is None else after - pg0[producer]
    return _Insert(seconds, producer, pg0, producer_cpu)


async def _long(
    run: Run, session: Session, workers: list[int], n: int, long_n: int
) -> dict[str, Any]:
    """Drain on in batches up to ``long_n`` jobs; the workers' RSS after each batch."""
    assert session.supervisor.proc is not None
    done = n
    samples = []
    async with Queue(session.url) as queue:
        while done < long_n:
            batch = min(LONG_BATCH_JOBS, long_n - done)
            await queue.submit_jobs(noop_jobs(batch))
            await wait_drained(session.url, run.timeout_s, session.supervisor.proc)
            done += batch
            rss = sum((procs.rss_bytes(p) or 0) for p in workers)
            samples.append(round(rss / BYTES_PER_MB, 1))
            await aquery(session.url, "DELETE FROM worker_jobs WHERE finished IS NOT NULL")
    first = samples[0] if samples else None
    return {
        "jobs": done,
        "worker_rss_mb_per_10k": samples,
        "growth_mb_after_first_10k": rounded(samples[-1] - first, 1) if first else None,
    }


def notes(figure: Figure) -> list[str]:
    x = figure.extra
    cpu = x.get("cpu_s_per_1k", {})
    out = [
        f"CPU ms/1k: workers {ms(cpu.get('workers'))}, supervisor {ms(cpu.get('supervisor'))}, "
        f"PG {ms(cpu.get('postgres_drain'))} (+{ms(cpu.get('postgres_insert'))} insert)",
        f"RSS MB {x.get('worker_rss_mb_before')} -> {x.get('worker_rss_mb_after')}",
    ]
    if "long" in x:
        long = x["long"]
        out.append(f"long: {long['jobs']} jobs, RSS growth {long['growth_mb_after_first_10k']} MB")
    return out
