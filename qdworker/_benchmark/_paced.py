"""Latency of single jobs submitted at a fixed pace to an idle, warmed-up worker: the part
``wakeup`` and ``steady`` share.

The producer calls ``submit_job`` on a schedule (open loop: a late call is not made up for by
waiting less later, its lag is recorded), taking ``time.time()`` before each call and right
after it returned (its commit). The handler's start time is its ``result`` (``time.time()`` in
the worker); all clocks are the same machine's clock when the database is local. The latency
is handler start - ``submit_job`` returned, ``*_from_call`` - before the call; it is split into
commit -> claim statement start (the database's ``started``) and claim -> handler start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio

from .._client import Queue
from ._figures import Figure, ms_percentiles, rounded
from ._run import Session
from ._scratch import aquery, wait_drained
from .jobs import NOOP

IDLE_BEFORE_S = 1.0  # pause before producing, so that the worker is idle
START_DELAY_S = 0.01  # from the schedule's computation to its first call
_LATENCY = "handler start - submit_job returned (commit); *_from_call: - before the call"


@dataclass
class Paced:
    """The jobs a paced producer submitted and when each was handled."""

    n: int
    rate_per_s: float
    sent: dict[int, tuple[float, float]]  # id -> time.time() before the call, after it returned
    produce_s: float  # from the first scheduled call to the last call's return
    max_lag_s: float  # the latest a call was made after its scheduled time
    rows: list[tuple[Any, ...]]  # id, handler start (None if not handled), finished, started

    @property
    def first_call(self) -> float:
        return min(before for before, _ in self.sent.values())

    @property
    def last_finished(self) -> float:
        last: float = max(finished for _, _, finished, _ in self.rows)
        return last

    def figure(
        self, workload: str, seconds: float, jobs_per_s: float | None, settings: dict[str, Any]
    ) -> Figure:
        """The latency figure, timed ``seconds`` (the workload's choice)."""
        handled = [(self.sent[i], h, st) for i, h, _, st in self.rows if h is not None]
        from_commit = [h - after for (_, after), h, _ in handled]
        from_call = [h - before for (before, _), h, _ in handled]
        to_claim = [st - after for (_, after), _, st in handled]
        claim_to_handler = [h - st for _, h, st in handled]
        c50, c95, c99 = ms_percentiles(from_call)
        return Figure(
            workload,
            self.n,
            seconds,
            jobs_per_s,
            *ms_percentiles(from_commit),
            settings=settings,
            extra={
                "latency": _LATENCY,
                "p50_ms_from_call": rounded(c50, 3),
                "p95_ms_from_call": rounded(c95, 3),
                "p99_ms_from_call": rounded(c99, 3),
                "max_ms": rounded(max(from_commit) * 1000, 3) if from_commit else None,
                "commit_to_claim_ms_p50_p95": _p50_p95(to_claim),
                "claim_to_handler_ms_p50_p95": _p50_p95(claim_to_handler),
                "rate_asked": self.rate_per_s,
                "rate_achieved": rounded(self.n / self.produce_s, 1),
                "producer_max_lag_s": rounded(self.max_lag_s, 4),
            },
        )


async def paced(session: Session, n: int, rate_per_s: float, timeout_s: float) -> Paced:
    """Submit ``n`` jobs at ``rate_per_s`` after an idle pause; wait until all are handled."""
    await trio.sleep(IDLE_BEFORE_S)
    sent: dict[int, tuple[float, float]] = {}
    max_lag_s = 0.0
    async with Queue(session.url) as queue:
        start = time.monotonic() + START_DELAY_S
        for i in range(n):
            delay = start + i / rate_per_s - time.monotonic()
            if delay > 0:
                await trio.sleep(delay)
            else:
                max_lag_s = max(max_lag_s, -delay)
            before = time.time()
            job = await queue.submit_job(type=NOOP, data={"i": i})
            sent[job.id] = (before, time.time())
        produce_s = time.monotonic() - start
    assert session.supervisor.proc is not None
    await wait_drained(session.url, timeout_s, session.supervisor.proc)
    rows = await aquery(
        session.url,
        "SELECT id, (result #>> '{}')::float8, extract(epoch FROM finished)::float8,"
        " extract(epoch FROM started)::float8 FROM worker_jobs WHERE id = ANY(%s)",
        (list(sent),),
    )
    return Paced(n, rate_per_s, sent, produce_s, max_lag_s, rows)


def _p50_p95(seconds: list[float]) -> list[float | None]:
    return [rounded(v, 3) for v in ms_percentiles(seconds)[:2]]


def notes(figure: Figure) -> list[str]:
    x = figure.extra
    return [f"from call p50/p95 {x.get('p50_ms_from_call')}/{x.get('p95_ms_from_call')} ms"]
