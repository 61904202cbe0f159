"""What a run cost: its wall time, the worker process's CPU time over it and the process's peak
resident memory while it went on (the ``run_*`` columns, written with the outcome).

What is measured, exactly:

* **Wall time**: the handler's start to its end, on the monotonic clock.
* **CPU time**: ``getrusage(RUSAGE_SELF)`` user + system time of the whole worker process
  (every thread: the handler's, the worker's own bookkeeping) at the end minus at the start,
  each reading at most :data:`USAGE_REUSE_SECONDS` old. Exact (to that) for a run alone in
  its process; when other runs of the process overlapped it (``cpu_shared``), an upper bound:
  it includes their CPU time too.
* **Peak RSS**: the highest of the process's resident set size sampled every
  :data:`RSS_SAMPLE_SECONDS` while the run went on (from ``/proc/self/statm``) and the sample
  just before it started; when the process reached a new lifetime peak during the run
  (``ru_maxrss`` rose), that peak, which is then exact. A spike shorter than the sampling
  interval that stays below the lifetime peak is missed. ``None`` where ``/proc`` is missing
  and the lifetime peak did not rise.

One :data:`METER` per process (CPU time and memory are the process's). Its cost per run is two
clock reads and at most two ``getrusage`` calls (fewer when runs start and end close
together); the sampler (:meth:`Meter.sample_forever`, run by the worker) reads one small file
per interval. Nothing here raises: an unreadable ``/proc`` leaves the sample unknown.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Final

import trio

#: How often the worker samples its resident memory.
RSS_SAMPLE_SECONDS: Final = 0.1
#: A ``getrusage`` reading is reused for this long: runs that start or end together (a
#: claimed batch, short handlers) share one call. The CPU time of a run is off by at most
#: this much at either end.
USAGE_REUSE_SECONDS: Final = 0.0002
#: ``ru_maxrss`` is in KiB on Linux, in bytes on macOS.
_MAXRSS_UNIT_BYTES: Final = 1 if sys.platform == "darwin" else 1024
_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM: Final = "/proc/self/statm"
_getrusage: Final = resource.getrusage
_SELF: Final = resource.RUSAGE_SELF
_monotonic: Final = time.monotonic


@dataclass(slots=True)
class RunFigures:
    """One run's figures, as the ``run_*`` columns store them."""

    outcome: str | None  # run_outcome; None: the run did not end (the worker is stopping)
    wall_ms: float
    cpu_ms: float
    cpu_shared: bool
    peak_rss_bytes: int | None
    traceparent: str | None = None  # the run's span (tracing on)


@dataclass(eq=False, slots=True)
class Measure:
    """A run being measured (from :meth:`Meter.begin`)."""

    wall: float
    cpu: float
    maxrss: int  # ru_maxrss at the start, in its own unit
    starts: int  # the meter's start count after this start
    shared: bool  # another run was in progress when it started
    peak: int | None = field(default=None)  # highest RSS sample so far, bytes


def read_rss() -> int | None:
    """The process's resident set size now, in bytes (None: no ``/proc``)."""
    try:
        with open(_STATM, "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class Meter:
    """Measures the runs of this process (see the module docstring)."""

    def __init__(self) -> None:
        self._active: set[Measure] = set()
        self._starts = 0
        self._read_at = -USAGE_REUSE_SECONDS  # the last getrusage reading (monotonic)
        self._cpu = 0.0
        self._maxrss = 0
        #: The latest RSS sample, bytes (None: not sampled yet).
        self.last_rss: int | None = None

    def _usage(self) -> tuple[float, float, int]:
        """Now (monotonic), the process's CPU seconds and ``ru_maxrss``: read again unless
        the last reading is under :data:`USAGE_REUSE_SECONDS` old."""
        now = _monotonic()
        if now - self._read_at > USAGE_REUSE_SECONDS:
            usage = _getrusage(_SELF)
            self._cpu = usage.ru_utime + usage.ru_stime
            self._maxrss = usage.ru_maxrss
            self._read_at = now
        return now, self._cpu, self._maxrss

    def begin(self) -> Measure:
        """A run starts now."""
        now, cpu, maxrss = self._usage()
        self._starts += 1
        measure = Measure(now, cpu, maxrss, self._starts, bool(self._active), self.last_rss)
        self._active.add(measure)
        return measure

    def end(self, measure: Measure, outcome: str | None) -> RunFigures:
        """The run of ``measure`` ended now, with ``outcome`` (``run_outcome``)."""
        now, cpu, maxrss = self._usage()
        self._active.discard(measure)
        peak = measure.peak
        if maxrss > measure.maxrss:  # a new lifetime peak, reached during the run
            peak = maxrss * _MAXRSS_UNIT_BYTES
        return RunFigures(
            outcome,
            (now - measure.wall) * 1000,
            (cpu - measure.cpu) * 1000,
            measure.shared or self._starts != measure.starts,
            peak,
        )

    def sample(self) -> None:
        """Read the RSS now; raise the peak of every run in progress to it."""
        rss = self.last_rss = read_rss()
        if rss is None:
            return
        for measure in self._active:
            if measure.peak is None or rss > measure.peak:
                measure.peak = rss

    async def sample_forever(self) -> None:
        """Sample every :data:`RSS_SAMPLE_SECONDS` until cancelled."""
        while True:
            self.sample()
            await trio.sleep(RSS_SAMPLE_SECONDS)


#: The meter of this process.
METER: Final = Meter()
