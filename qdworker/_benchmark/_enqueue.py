"""``enqueue``: N single ``submit_job`` calls, sequential, on one connection, no worker running.

Each call is one INSERT in a transaction of its own. Timed by the wall clock around the loop;
the CPU per job is the client process's (``time.process_time()``), its Postgres backend's and
all Postgres processes' (``/proc``).
"""

from __future__ import annotations

import time

from .._client import Queue
from . import procs
from ._figures import Figure, rounded
from ._run import Run
from ._scratch import client_backend
from .jobs import NOOP


async def enqueue(run: Run, n: int) -> Figure:
    url = await run.db.afresh()
    async with Queue(url) as queue:
        pid = await client_backend(url)
        pg0 = procs.snapshot(run.db.pg_pids())
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for i in range(n):
            await queue.submit_job(type=NOOP, data={"i": i})
        seconds = time.perf_counter() - t0
        client_cpu = time.process_time() - cpu0
        pg1 = procs.snapshot(run.db.pg_pids())
    pg_backend = (pg1.get(pid, 0.0) - pg0.get(pid, 0.0)) if pid in pg1 else None
    pg_all = procs.used(pg0, pg1) if run.db.postmaster else None
    return Figure(
        "enqueue",
        n,
        seconds,
        n / seconds,
        settings=run.settings(),
        extra={
            "api": "Queue.submit_job, one call (= one transaction) each, sequential",
            "cpu_ms_per_job": {
                "client_process": _ms_per_job(client_cpu, n),
                "postgres_backend": _ms_per_job(pg_backend, n),
                "postgres_all": _ms_per_job(pg_all, n),
            },
        },
    )


def _ms_per_job(cpu_s: float | None, n: int) -> float | None:
    return None if cpu_s is None else rounded(cpu_s * 1000 / n, 3)


def notes(figure: Figure) -> list[str]:
    cpu = figure.extra.get("cpu_ms_per_job", {})
    return [f"CPU ms/job: client {cpu.get('client_process')}, PG {cpu.get('postgres_backend')}"]
