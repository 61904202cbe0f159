"""The benchmark's job type, imported by the workers through ``QDWORKER_JOBS``.

``qdworker.bench.noop`` does nothing but return ``time.time()`` taken when the handler
starts: stored as the job's ``result``, it is the "handler started" timestamp of the
wake-up and steady-state latencies (same machine clock as the producer's commit time).
"""

from __future__ import annotations

import time

from .._registry import Context, job

NOOP = "qdworker.bench.noop"


@job(NOOP)
async def noop(ctx: Context) -> float:
    del ctx
    return time.time()
