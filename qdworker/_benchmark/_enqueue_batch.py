"""``enqueue_batch``: one ``submit_jobs`` call of N jobs (one INSERT ... FROM
jsonb_to_recordset), no worker running. Timed by the wall clock around the call.
"""

from __future__ import annotations

import time

from .._client import Queue
from ._figures import Figure
from ._run import Run
from .jobs import NOOP


async def enqueue_batch(run: Run, n: int) -> Figure:
    url = await run.db.afresh()
    jobs = [{"type": NOOP, "data": {"i": i}} for i in range(n)]
    async with Queue(url) as queue:
        t0 = time.perf_counter()
        await queue.submit_jobs(jobs)
        seconds = time.perf_counter() - t0
    return Figure(
        "enqueue_batch",
        n,
        seconds,
        n / seconds,
        settings=run.settings(),
        extra={"api": "Queue.submit_jobs, one call (one INSERT ... jsonb_to_recordset)"},
    )


def notes(figure: Figure) -> list[str]:
    del figure
    return []
