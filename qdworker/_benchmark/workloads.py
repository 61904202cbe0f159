"""The benchmark's workloads by name, and the order they run in: each one measures the
current code at default settings.

Every workload gets a fresh scratch database (``qdworker_bench``, migrated) on one server: the
embedded Postgres in a temporary data dir of its own, or the server of ``DATABASE_URL``. The
supervisor runs as a subprocess, ``python -m qdworker`` with default settings except
``DATABASE_URL``, ``QDWORKER_JOBS`` (the no-op job type of :mod:`.jobs`), ``QDWORKER_WS_PORT=0``
and ``QDWORKER_HTTP_PORT=0`` (any free port: the defaults 8765 and 8766 may be taken) and, for
``scaling``, ``WORKER_COUNT``.

Timings come from the database and the handler, never from polling: ``started`` (claim) and
``finished`` (completion commit) are the database's clock; the handler's start time is its
``result`` (``time.time()`` in the worker); the producer takes ``time.time()`` before the call
and right after ``submit_job`` returned (its commit). All clocks are the same machine's clock
when the database is local.

CPU is read from ``/proc``: worker processes (the supervisor's children), the supervisor, and
every child of the postmaster (backends and background writers) alive at the end of the window.

One module per workload says what it measures and how: :mod:`._drain`, :mod:`._scaling`,
:mod:`._enqueue`, :mod:`._enqueue_batch`, :mod:`._wakeup` and :mod:`._steady` (both on
:mod:`._paced`), :mod:`._cost`, :mod:`._limits` and :mod:`._drain_clients` (``--clients
K``). Shared: the scratch database (:mod:`._scratch`), what a workload is handed
(:mod:`._run`), the supervisor and ``/proc`` (:mod:`.procs`), the figures and their rendering
(:mod:`._figures`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from . import (
    _cost,
    _drain,
    _drain_clients,
    _enqueue,
    _enqueue_batch,
    _figures,
    _limits,
    _scaling,
    _steady,
    _wakeup,
)
from ._figures import Figure, Notes
from ._run import Run

ALL_WORKLOADS = (
    "drain", "enqueue", "enqueue_batch", "wakeup", "steady", "scaling", "cost", "limits",
)  # fmt: skip

#: Each figure's notes in the table, by the figure's workload (``drain_clients``: ``--clients``).
NOTES: dict[str, Notes] = {
    "drain": _drain.notes,
    "scaling": _scaling.notes,
    "enqueue": _enqueue.notes,
    "enqueue_batch": _enqueue_batch.notes,
    "wakeup": _wakeup.notes,
    "steady": _steady.notes,
    "cost": _cost.notes,
    "drain_clients": _drain_clients.notes,
    "limits:concurrency": _limits.notes,
    "limits:fair": _limits.notes,
}


@dataclass
class Options:
    n: int = 20_000  # drain, enqueue_batch, cost, clients drain
    n_enqueue: int = 5_000  # enqueue (one call each)
    wakeup_n: int = 200
    wakeup_interval_s: float = 0.05
    steady_rate: float = 500.0  # submit_job calls per second
    steady_seconds: float = 20.0
    scaling: tuple[int, ...] = (1, 2, 4)
    clients: int = 0
    long: bool = False
    long_n: int = 100_000
    workloads: tuple[str, ...] = ALL_WORKLOADS
    database_url: str | None = None
    timeout_s: float = 300.0  # per wait for a queue to drain
    keep_logs: Path | None = None  # folder for supervisor logs (default: temporary)
    progress: Callable[[str], None] | None = None


def render_table(figures: Sequence[Figure]) -> str:
    """A fixed-width table of the figures (the human-readable output)."""
    return _figures.render_table(figures, lambda fig: NOTES.get(fig.workload, _no_notes)(fig))


def _no_notes(figure: Figure) -> list[str]:
    del figure
    return []


class Bench:
    """Runs the selected workloads; :meth:`run` returns the figures in order."""

    def __init__(self, options: Options) -> None:
        self.o = options
        self.figures: list[Figure] = []
        self._run = Run(
            options.database_url, options.keep_logs, options.timeout_s, options.progress
        )

    def run(self) -> list[Figure]:
        with self._run.opened():
            trio.run(self._main)
        return self.figures

    def _emit(self, figure: Figure) -> None:
        self.figures.append(figure)
        self._run.say(f"{figure.workload}: done")

    async def _main(self) -> None:
        o, run, w = self.o, self._run, set(self.o.workloads)
        if "drain" in w or "scaling" in w:
            await self._drains(emit_drain="drain" in w, scaling="scaling" in w)
        if "enqueue" in w:
            run.say(f"enqueue, {o.n_enqueue} single submit_job calls")
            self._emit(await _enqueue.enqueue(run, o.n_enqueue))
        if "enqueue_batch" in w:
            run.say(f"enqueue_batch, one submit_jobs call of {o.n}")
            self._emit(await _enqueue_batch.enqueue_batch(run, o.n))
        if "wakeup" in w or "steady" in w:
            await self._idle_session(wakeup="wakeup" in w, steady="steady" in w)
        if "cost" in w:
            run.say(f"cost: warm drain of {o.n}" + (f" then up to {o.long_n}" if o.long else ""))
            self._emit(await _cost.cost(run, o.n, o.long_n if o.long else None))
        if "limits" in w:
            run.say(f"limits: drains of {o.n} in a limited queue (concurrency, fair by key)")
            for figure in await _limits.limits(run, o.n):
                self._emit(figure)
        if o.clients:
            run.say(f"drain with {o.clients} websocket clients, N={o.n}")
            self._emit(await _drain_clients.drain_clients(run, o.n, o.clients))

    async def _drains(self, *, emit_drain: bool, scaling: bool) -> None:
        """One drain per worker count (only one worker without ``scaling``); the one-worker
        drain is the ``drain`` figure."""
        drains: dict[int, Figure] = {}
        for count in list(self.o.scaling) if scaling else [1]:
            self._run.say(f"drain with {count} worker(s), N={self.o.n}")
            drains[count] = await _drain.drain(self._run, self.o.n, count)
            if count == 1 and emit_drain:
                self._emit(drains[count])
        if scaling:
            for count in self.o.scaling:
                self._emit(_scaling.scaling(drains[count], count))

    async def _idle_session(self, *, wakeup: bool, steady: bool) -> None:
        """``wakeup`` and ``steady`` on one warmed-up supervisor."""
        o, run = self.o, self._run
        async with run.warm_session("idle") as session:
            if wakeup:
                run.say(
                    f"wakeup: {o.wakeup_n} single inserts {o.wakeup_interval_s * 1000:g} ms apart"
                )
                self._emit(await _wakeup.wakeup(run, session, o.wakeup_n, o.wakeup_interval_s))
            if steady:
                run.say(f"steady: {o.steady_rate:g}/s for {o.steady_seconds:g} s")
                self._emit(await _steady.steady(run, session, o.steady_rate, o.steady_seconds))
