"""The worker's conveyor: every claimed job, from its claim until its outcome is written.

Each :class:`~.run.Run` passes through the :class:`Flow` in one direction::

    claimer --add()--> ready --next_run()--> runner --done()--> finished --take()--> completer
                                                                            --written()--> gone

A run is *held* from its claim until its outcome is written: it keeps its claim (and its
lease is renewed) all that time. :meth:`Flow.halt` stops a run wherever it is: a running one
through its cancel scope, a queued one at once (it never starts; its outcome goes straight to
the completer).

The claimer asks :meth:`Flow.room` how many jobs to claim: free slots
(``QDWORKER_CONCURRENCY``) plus a small ready queue sized by the recent completion rate
(:class:`~.pacing.Pacer`), and nothing while :data:`MAX_UNWRITTEN` outcomes wait to be written
(the database is slow or away: the worker stops taking work rather than piling results up).
Everything runs in the trio thread, except :meth:`Flow.snapshot`, which the lease keeper's
thread may call.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import trio

from ._tally import Tally
from .pacing import Pacer
from .run import Outcome, Run, Stop
from .wakeup import Wakeup

#: Outcomes waiting to be written before the claimer pauses (backpressure).
MAX_UNWRITTEN: Final = 2000


class Flow:
    """The runs of one worker; see the module docstring."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.held: dict[int, Run] = {}
        self.ready: deque[Run] = deque()
        self.finished: deque[Run] = deque()
        self.running = 0
        self.completed = 0
        self.failed = 0
        self.pacer = Pacer()
        #: What ran, by queue and type, since the last heartbeat (for the supervisor's metrics).
        self.tally = Tally()
        #: Wakes the claimer: a NOTIFY, room freed while it wanted more, shutdown.
        self.wake = Wakeup()
        #: Set by the claimer when it found more work than it had room for.
        self.want_room = False
        self._runnable = trio.Event()
        self._writable = trio.Event()
        self._all_written = trio.Event()
        self._all_written.set()
        self._none_running = trio.Event()
        self._none_running.set()

    @property
    def unwritten(self) -> int:
        """Runs whose outcome is known but not written yet."""
        return len(self.held) - len(self.ready) - self.running

    # -- claimer -----------------------------------------------------------------------------
    def room(self) -> int:
        """How many jobs to claim now: free slots plus room in the ready queue."""
        if self.unwritten >= MAX_UNWRITTEN:
            return 0
        room = self.concurrency - self.running + self.pacer.target - len(self.ready)
        if self.ready and room < (self.concurrency + self.pacer.target) // 4:
            return 0  # enough ready: wait to claim a worthwhile batch
        return max(0, room)

    def free_slots(self) -> int:
        """Slots no running or ready job has taken: how many jobs of limited queues to claim
        (a claimed job holds a slot of its queue, so it must start at once)."""
        if self.unwritten >= MAX_UNWRITTEN:
            return 0
        return max(0, self.concurrency - self.running - len(self.ready))

    def add(self, run: Run) -> None:
        self.held[run.job.id] = run
        self.ready.append(run)
        if run.lost:
            self.tally.lost(run.job)
        self._runnable.set()

    # -- runner ------------------------------------------------------------------------------
    async def next_run(self) -> Run:
        """Wait for a ready run and a free slot; the run is then counted as running."""
        while not (self.ready and self.running < self.concurrency):
            if not self.ready:
                self.pacer.idle()
            self._runnable = trio.Event()
            await self._runnable.wait()
        run = self.ready.popleft()
        run.state = "running"
        self.running += 1
        if self._none_running.is_set():
            self._none_running = trio.Event()
        return run

    def done(self, run: Run, outcome: Outcome) -> None:
        """``run`` ended (or was stopped before it started) with ``outcome``."""
        if run.state == "running":
            self.running -= 1
            self.pacer.completed()
            self._runnable.set()
            if not self.running:
                self._none_running.set()
        run.state = "done"
        run.outcome = outcome
        self.finished.append(run)
        self._writable.set()
        if self._all_written.is_set():
            self._all_written = trio.Event()
        if self.want_room:
            self.wake.set()

    def halt(self, run: Run, stop: Stop, reason: str) -> None:
        """Stop ``run`` (see :meth:`~.run.Run.halt`); a queued run is taken out of the ready
        queue and finished at once with the outcome its stop calls for."""
        run.halt(stop, reason)
        if run.state != "queued":
            return
        try:
            self.ready.remove(run)
        except ValueError:
            return
        outcome = run.stopped_outcome()
        assert outcome is not None
        self.done(run, outcome)

    # -- completer ---------------------------------------------------------------------------
    async def take(self, most: int) -> list[Run]:
        """Wait for finished runs; take up to ``most`` of them."""
        while not self.finished:
            self._writable = trio.Event()
            await self._writable.wait()
        return [self.finished.popleft() for _ in range(min(most, len(self.finished)))]

    def written(self, run: Run) -> None:
        """The outcome of ``run`` is written (or rejected, or discarded): no longer held."""
        if self.held.get(run.job.id) is run:
            del self.held[run.job.id]
        outcome = run.outcome
        if outcome is not None and outcome.ending == "succeeded":
            self.completed += 1
        elif outcome is not None and outcome.ending not in ("release", "discard"):
            self.failed += 1
        if self.want_room and self.unwritten == MAX_UNWRITTEN - 1:
            self.wake.set()
        if self.unwritten == 0:
            self._all_written.set()

    async def wait_none_running(self) -> None:
        """Return once no handler runs."""
        await self._none_running.wait()

    async def wait_all_written(self) -> None:
        """Return once every outcome known so far is written."""
        await self._all_written.wait()

    # -- anyone ------------------------------------------------------------------------------
    def snapshot(self) -> list[Run]:
        """The held runs (safe to call from another thread: a copy)."""
        return list(self.held.values())
