"""Progress a handler reports (``ctx.progress``): checked at once, coalesced, written at most
every :data:`MIN_WRITE_INTERVAL_SECONDS` per run, fenced by the run's claim, and sent as a
``progress`` job event after each write.

One :class:`ProgressWriter` per worker process owns a connection (opened on first use, so a
worker whose handlers never report progress never opens it) and one task. A run that reports
gets a :class:`RunProgress` (created on its first report: runs that never report cost
nothing); the handler's calls only replace its latest value (under a lock: a plain-def
handler reports from its thread) and, once per write, wake the writer. The writer stores the
latest value of every run whose interval has passed, in one statement, then sends each stored
value as an event. When the run ends, the runner calls :meth:`ProgressWriter.finish`: the last
value is written before the outcome (bounded by :data:`FINISH_SECONDS`), and later reports
raise ``RuntimeError``.

Progress is best effort: a write the database refuses or cannot take (outage) is logged and
its value dropped; the next report writes again. A run that no longer holds its claim writes
nothing and sends no event.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Generator
from datetime import UTC, datetime
from typing import Any, Final

import trio

from .._db.connect import DbOptions
from .._db.connection import Link
from .._db.progress import write_progress
from .._logs import module_logger
from .._protocol import job_event
from ..errors import DatabaseError
from .outbox import Outbox
from .run import Run

logger = module_logger(__name__)

#: Shortest time between two writes of one run's progress (later values are coalesced).
MIN_WRITE_INTERVAL_SECONDS: Final = 0.25
#: Longest progress ``message``, in characters.
MAX_MESSAGE_CHARS: Final = 1024
#: Largest progress ``data``, in bytes of JSON.
MAX_DATA_BYTES: Final = 16 * 1024
#: How long the end of a run may wait for its last progress to be written.
FINISH_SECONDS: Final = 5.0


def progress_value(fraction: Any, message: Any = None, data: Any = None) -> dict[str, Any]:
    """The value stored for one report: ``{"fraction", "message", "data", "at"}``.

    Raises ``TypeError`` if ``fraction`` is not a number (bool is not) or ``message`` is not a
    string or None, and ``ValueError`` if ``fraction`` is not finite or outside [0, 1],
    ``message`` is longer than :data:`MAX_MESSAGE_CHARS` or contains NUL, or ``data`` is not
    JSON or larger than :data:`MAX_DATA_BYTES` as JSON.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(f"progress fraction must be a number, not {type(fraction).__name__}")
    if not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"progress fraction must be a finite number in [0, 1], not {fraction!r}")
    if message is not None:
        if not isinstance(message, str):
            raise TypeError(f"progress message must be a string, not {type(message).__name__}")
        if len(message) > MAX_MESSAGE_CHARS:
            raise ValueError(
                f"progress message is {len(message)} characters; the limit is {MAX_MESSAGE_CHARS}"
            )
        if "\x00" in message:
            raise ValueError("progress message contains NUL, which Postgres cannot store")
    if data is not None:
        try:
            text = json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"progress data is not JSON: {exc}") from exc
        if len(text.encode()) > MAX_DATA_BYTES:
            raise ValueError(
                f"progress data is {len(text.encode())} bytes as JSON; the limit is"
                f" {MAX_DATA_BYTES}"
            )
        if "\\u0000" in text:
            raise ValueError("progress data contains NUL, which Postgres cannot store")
    at = datetime.now(UTC).isoformat()
    return {"fraction": float(fraction), "message": message, "data": data, "at": at}


class Reported:
    """What ``ctx.progress`` returns: awaitable (at once) from trio and asyncio handlers,
    ignorable from plain-def ones."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that finishes at once


REPORTED: Final = Reported()


class RunProgress:
    """The progress of one run: its latest unwritten value and when it may be written next."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.next_write = -math.inf  # trio clock
        self._lock = threading.Lock()
        self._latest: dict[str, Any] | None = None
        self._waiting = False  # the writer was told and has not taken the value yet
        self._ended = False

    def put(self, value: dict[str, Any]) -> bool:
        """Replace the latest value (any thread); True if the writer must be told. Raises
        ``RuntimeError`` once the run ended."""
        with self._lock:
            if self._ended:
                raise RuntimeError(f"job {self.run.job.id}: its run ended; progress is final")
            self._latest = value
            told, self._waiting = self._waiting, True
        return not told

    def end(self) -> None:
        """The run ended: later reports raise (its last value may still be taken)."""
        with self._lock:
            self._ended = True

    def take(self) -> dict[str, Any] | None:
        """The latest unwritten value (trio thread)."""
        with self._lock:
            value, self._latest = self._latest, None
            self._waiting = False
        return value


class ProgressWriter:
    """Writes the progress of this worker's runs; see the module docstring."""

    def __init__(self, url: str, options: DbOptions, outbox: Outbox, owner: str) -> None:
        self._url = url
        self._options = options
        self._outbox = outbox
        self._owner = owner
        self._link: Link | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._waiting: dict[int, RunProgress] = {}  # at most one per running run
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one write at a time, in the order taken

    def report(self, progress: RunProgress, value: dict[str, Any]) -> None:
        """Record ``value`` as the run's latest (from the trio thread or a handler's thread).
        Raises ``RuntimeError`` once the run ended, or if the writer is not running."""
        if not progress.put(value):
            return
        if self._token is None:
            raise RuntimeError("progress is not available: the worker's writer is not running")
        if threading.get_ident() == self._trio_thread:
            self._enqueue(progress)
        else:
            self._token.run_sync_soon(self._enqueue, progress)

    def _enqueue(self, progress: RunProgress) -> None:
        self._waiting[progress.run.job.id] = progress
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write reported progress until cancelled; then close the connection."""
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self._drain()
        finally:
            if self._link is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await self._link.aclose()

    async def _drain(self) -> None:
        """Write what waits, each run no sooner than its interval allows, until none waits."""
        while self._waiting:
            now = trio.current_time()
            ready = [p for p in self._waiting.values() if p.next_write <= now]
            if not ready:
                with trio.move_on_at(min(p.next_write for p in self._waiting.values())):
                    await self._wake.wait()  # a run reporting for the first time
                self._wake = trio.Event()
                continue
            for progress in ready:
                del self._waiting[progress.run.job.id]
                progress.next_write = now + MIN_WRITE_INTERVAL_SECONDS
            await self._write(ready)

    async def finish(self, progress: RunProgress) -> None:
        """The run ended: write its last value now (bounded by :data:`FINISH_SECONDS`)."""
        progress.end()
        self._waiting.pop(progress.run.job.id, None)
        with trio.move_on_after(FINISH_SECONDS) as scope:
            await self._write([progress])
        if scope.cancelled_caught:
            logger.warning("job %d: its last progress was not written in time", progress.run.job.id)

    async def _write(self, runs: list[RunProgress]) -> None:
        async with self._lock:
            taken = [(p.run, p.take()) for p in runs]
            entries = [(run, value) for run, value in taken if value is not None]
            if not entries:
                return
            rows = [(run.job.id, run.job.claims, value) for run, value in entries]
            if self._link is None:
                self._link = Link(self._url, "progress", self._options)
            try:
                written = await self._link.run(
                    lambda raw: write_progress(raw, owner=self._owner, entries=rows),
                    idempotent=True,
                )
            except DatabaseError as exc:
                logger.warning("could not write the progress of %d job(s): %s", len(rows), exc)
                return
        if self._outbox.events_wanted:
            for run, value in entries:
                if run.job.id in written:
                    self._outbox.event(job_event("progress", run.job, progress=value))
