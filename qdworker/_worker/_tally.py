"""What a worker process ran, counted in memory by (queue, job type) and handed to the
supervisor with each heartbeat (:func:`~qdworker._protocol.heartbeat`'s ``tally``) as deltas.

The runner counts starts (:meth:`Tally.started`, with the pickup latency: the claim's
``started`` minus ``due``, both the database's clock) and the claimer lost runs it rescues
(:meth:`Tally.lost`); the completer counts outcomes once the database accepted them
(:meth:`Tally.finished`), so the counts agree with ``worker_jobs``. Each call is a dict lookup
and a few integer additions; nothing here does I/O or raises.

Memory is bounded: after :data:`MAX_KEYS` distinct (queue, type) pairs since the last
:meth:`Tally.take`, further pairs are counted under the queue :data:`OVERFLOW_QUEUE`.
Used from the trio thread only.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from datetime import datetime
from typing import Any, Final

from .._model import Job
from .._protocol import PICKUP_BOUNDS_MS, RUN_BOUNDS_MS, TALLY_COUNTS

#: Distinct (queue, type) pairs kept between two heartbeats (bounds memory and frame size).
MAX_KEYS: Final = 500
#: Where pairs beyond :data:`MAX_KEYS` are counted.
OVERFLOW_QUEUE: Final = "(other)"
#: The endings counted (a release or a discarded run is no outcome).
_ENDINGS: Final = {"succeeded", "failed", "timed_out", "cancelled"}


def bucket_index(bounds: tuple[int, ...], value_ms: float) -> int:
    """The histogram entry ``value_ms`` falls in: the first bound >= it, else the overflow."""
    return bisect_left(bounds, value_ms)


class _Counts:
    __slots__ = ("counts", "pickup_hist", "run_hist")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(TALLY_COUNTS, 0)
        self.run_hist = [0] * (len(RUN_BOUNDS_MS) + 1)
        self.pickup_hist = [0] * (len(PICKUP_BOUNDS_MS) + 1)


class Tally:
    """Counts since the last :meth:`take`; see the module docstring."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], _Counts] = {}

    def _for(self, job: Job) -> _Counts:
        key = (job.queue, job.type)
        counts = self._counts.get(key)
        if counts is None:
            if len(self._counts) >= MAX_KEYS:
                key = (OVERFLOW_QUEUE, job.type)
                counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = _Counts()
        return counts

    def started(self, job: Job) -> None:
        """A handler starts ``job`` (claimed with ``started`` set by the database)."""
        counts = self._for(job)
        counts.counts["started"] += 1
        pickup_ms = _pickup_ms(job.due, job.started)
        counts.counts["pickup_ms"] += int(pickup_ms)
        counts.pickup_hist[bucket_index(PICKUP_BOUNDS_MS, pickup_ms)] += 1

    def lost(self, job: Job) -> None:
        """``job``'s previous run was lost with its worker (this claim rescued it)."""
        self._for(job).counts["lost"] += 1

    def finished(self, job: Job, ending: str, run_ms: float | None, *, retried: bool) -> None:
        """The database accepted ``job``'s outcome (``ending``: succeeded, failed, timed_out,
        cancelled); ``run_ms``: how long its handler ran (None: it never started);
        ``retried``: a retry was inserted."""
        if ending not in _ENDINGS:
            return
        counts = self._for(job)
        counts.counts[ending] += 1
        if retried:
            counts.counts["retried"] += 1
        if run_ms is not None:
            counts.counts["run_ms"] += int(run_ms)
            counts.run_hist[bucket_index(RUN_BOUNDS_MS, run_ms)] += 1

    def take(self) -> list[dict[str, Any]]:
        """The counts since the last call, as heartbeat entries; starts over."""
        taken, self._counts = self._counts, {}
        return [
            {"queue": queue, "type": job_type, **c.counts, "run_hist": c.run_hist,
             "pickup_hist": c.pickup_hist}
            for (queue, job_type), c in taken.items()
        ]  # fmt: skip


def _pickup_ms(due: datetime | None, started: datetime | None) -> float:
    if due is None or started is None:
        return 0.0
    return max(0.0, (started - due).total_seconds() * 1000.0)


def resident_bytes() -> int | None:
    """This process's resident memory (``/proc/self/statm``; None where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
