"""``limits``: the :mod:`drain <._drain>` with the jobs in a limited queue, to show what the
limits cost: ``limits:concurrency`` (the queue's cluster-wide ``concurrency`` equal to the
worker's ``QDWORKER_CONCURRENCY``, so the limit itself never holds a job back) and
``limits:fair`` (``fair`` share between 100 concurrency keys, each limited to 5 running
jobs). Same timing and CPU figures as ``drain``: the price of the limited claim (a
per-queue lock, counting running jobs, choosing by key) shows in Postgres CPU per job.
"""

from __future__ import annotations

from typing import Any, Final

from ._drain import cold_drain, drain_extra
from ._figures import Figure, ms
from ._run import Run, exit_notes
from ._scratch import KEYS, aquery, submit_noops, window

#: Each case: the queue's settings (worker_queues), the jobs' extra fields.
CASES: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "concurrency": ("INSERT INTO worker_queues (name, concurrency) "
                    "VALUES ('limited', %(concurrency)s)", {"queue": "limited"}),
    "fair": ("INSERT INTO worker_queues (name, fair, key_concurrency) VALUES ('limited', true, 5)",
             {"queue": "limited", "concurrency_key": "k"}),
}  # fmt: skip


async def limits(run: Run, n: int) -> list[Figure]:
    figures = []
    for case, (settings_sql, fields) in CASES.items():
        url = await run.db.afresh()
        insert_s = await submit_noops(url, n, **fields)
        await aquery(url, settings_sql, {"concurrency": run.defaults.concurrency})
        await aquery(url, "ANALYZE worker_jobs")
        await aquery(url, "CHECKPOINT")
        cold = await cold_drain(run, url, f"limits-{case}", {})
        win = await window(url, exclude_warmup=False)
        extra = {"case": case, "keys": KEYS if "concurrency_key" in fields else None,
                 **drain_extra(n, insert_s, cold, win)}  # fmt: skip
        figure = Figure(f"limits:{case}", n, win.seconds, n / win.seconds,
                        settings=run.settings(), extra=extra)  # fmt: skip
        figure.add_notes([*([f"{win.failed} jobs failed"] if win.failed else []),
                          *exit_notes(cold.status)])  # fmt: skip
        figures.append(figure)
    return figures


def notes(figure: Figure) -> list[str]:
    x = figure.extra
    keys = f", {x['keys']} keys" if x.get("keys") else ""
    return [f"PG CPU {ms(x.get('postgres_cpu_s_per_1k'))} ms/1k (incl. start-up){keys}"]
