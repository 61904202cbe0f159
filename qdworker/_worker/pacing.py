"""How many claimed jobs a worker keeps ready beyond those running: a small local queue sized
by the recent completion rate.

Claiming only as many jobs as there are free slots (``QDWORKER_CONCURRENCY``) makes short jobs
pay a claim round trip per handful of jobs. So the worker also claims enough to cover
:data:`PREFETCH_SECONDS` of work at its recent completion rate, at most :data:`MAX_PREFETCH`
jobs. Fast jobs are thus claimed in batches of up to a few hundred; jobs that take a second
or more are never claimed ahead of a free slot (their rate makes the target zero), so they are
not held back from other workers.
"""

from __future__ import annotations

import time

#: Work held ready, in seconds at the recent completion rate.
PREFETCH_SECONDS = 0.05
#: Most jobs held ready beyond the running ones.
MAX_PREFETCH = 1000
#: Completions are counted over windows of this length.
RATE_WINDOW_SECONDS = 0.1


class Pacer:
    """Measures the completion rate; :attr:`target` is how many jobs to hold ready."""

    def __init__(self) -> None:
        self._window_start = time.monotonic()
        self._count = 0
        self.rate = 0.0  # completions per second over the last full window
        self.target = 0

    def completed(self) -> None:
        self._count += 1
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW_SECONDS:
            self.rate = self._count / elapsed
            self.target = min(MAX_PREFETCH, int(self.rate * PREFETCH_SECONDS))
            self._count = 0
            self._window_start = now

    def idle(self) -> None:
        """The queue ran dry: forget the old rate once a window has passed without work."""
        if time.monotonic() - self._window_start >= RATE_WINDOW_SECONDS and self._count == 0:
            self.rate = 0.0
            self.target = 0
