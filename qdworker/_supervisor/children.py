"""A worker slot of the supervisor, kept filled: :class:`Child`, the restart policy around one
:class:`~.process.WorkerProcess` after another.

:meth:`Child.run` is a service (``await nursery.start(child.run)``): it runs
``python -m qdworker._worker`` (or the ``argv`` given) and starts a new one when it ends, until
:meth:`Child.request_stop` or cancellation.

* Each process has its own worker id, ``{host}:{supervisor pid}:{random}:w{index}.{n}``,
  which it uses as ``lease_owner``. The random part differs in every supervisor, so a
  supervisor restarted in a container (same host name, same pid) never takes its
  predecessor's id.
* Once a process is gone, the leases it still held (none after a clean shutdown, which
  releases them itself, except those of handlers that ignored cancellation) are ended at once
  (``release_worker_leases``, which also wakes the other workers) so other workers can claim
  them. Failure to do so is logged (warning) and harmless: the leases then expire on their own.
* Restarts back off exponentially from ``backoff_initial`` to ``backoff_max``; the delay
  resets after a process lived ``healthy_lifetime``. From :data:`FAST_CRASH_ALARM_COUNT` fast
  crashes in a row on, each is logged at error level, with the reason the process reported
  (``worker-error``) when it did.

Errors: a process that cannot be spawned at all (``OSError``) counts as a crash and is
retried with the same backoff.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Final

import trio

from .._config import Config
from .._db import store
from .._db.connect import DbOptions
from .._db.connection import Link
from .._logs import module_logger
from .._redact import redact
from .process import Interest, MessageHandler, ProcessTimings, TallyHandler, WorkerProcess

logger = module_logger(__name__)

#: The worker process's command line.
DEFAULT_WORKER_ARGV: Final = (sys.executable, "-m", "qdworker._worker")
#: From this many fast crashes in a row on, each crash is logged at error level.
FAST_CRASH_ALARM_COUNT: Final = 3
#: Settings a worker never needs, kept out of its environment (job code runs there).
_CHILD_SECRETS: Final = frozenset({"QDWORKER_WS_SECRET"})
#: Bound on releasing a dead process's leases (connect + one UPDATE).
RELEASE_TIMEOUT_SECONDS: Final = 10.0

#: ``release(worker_id, signal)``: end the leases of that worker's unfinished jobs, recording
#: their runs as lost (with the name of the signal that killed the process, or None); returns
#: the count.
ReleaseLeases = Callable[[str, str | None], Awaitable[int]]


@dataclass(frozen=True)
class ChildTimings(ProcessTimings):
    """A process's timings, and the restart policy's (seconds)."""

    #: First restart delay after a crash; doubles per fast crash up to ``backoff_max``.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: A process that lived this long was healthy: the next restart delay starts over.
    healthy_lifetime: float = 10.0


def worker_id_prefix() -> str:
    """A new ``{hostname}:{pid}:{random}``: a supervisor's id, and the part of worker ids its
    children share. The random part makes it unique even where host names and pids repeat
    (containers) and when one process runs several supervisors."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def release_leases(
    database_url: str, options: DbOptions, worker_id: str, killed_by: str | None
) -> int:
    """End the leases of ``worker_id``'s unfinished jobs (``release_worker_leases``, which
    records their runs as lost, killed by ``killed_by``) on a connection of its own; returns
    how many jobs. Raises :class:`~qdworker.errors.DatabaseError` if the database cannot be
    reached."""
    async with Link(database_url, "supervisor", options, persistent=False) as link:
        return await link.run(lambda raw: store.release_worker_leases(raw, worker_id, killed_by))


def signal_name(exit_code: int | None) -> str | None:
    """The name of the signal that killed a process with ``exit_code`` (``SIGKILL``; None:
    it exited, or was never started)."""
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"SIG{-exit_code}"


def _default_on_message(worker_id: str, msg: Mapping[str, Any]) -> None:
    logger.debug("message from worker %s: %s", worker_id, msg.get("kind"))


@dataclass(frozen=True)
class ChildStatistics:
    """A snapshot of one slot. ``started_at`` is the wall-clock (UTC) spawn time of the
    current process; ``last_heartbeat`` is ``trio.current_time()`` of its last message
    (``None`` before the first). Job counters are summed over all the slot's processes;
    ``jobs_running`` and ``jobs_claimed`` are the current process's last report."""

    index: int
    worker_id: str | None
    pid: int | None
    alive: bool
    started_at: datetime | None
    last_heartbeat: float | None
    restarts: int
    fast_crashes: int
    last_exit_code: int | None
    jobs_running: int
    jobs_completed: int
    jobs_failed: int
    jobs_claimed: int


class Child:
    """Slot ``index`` of the supervisor: one worker process at a time (see the module doc)."""

    def __init__(
        self,
        config: Config,
        *,
        index: int,
        database_url: str,
        on_message: MessageHandler | None = None,
        release: ReleaseLeases | None = None,
        argv: Sequence[str] = DEFAULT_WORKER_ARGV,
        id_prefix: str | None = None,
        supervisor_id: str | None = None,
        interest: Interest | None = None,
        timings: ChildTimings | None = None,
        on_tally: TallyHandler | None = None,
    ) -> None:
        self._config = config
        self._on_tally = on_tally
        self.index = index
        self._database_url = database_url
        self._on_message = on_message or _default_on_message
        self._release = release or partial(
            release_leases, database_url, DbOptions(config.db_timeout)
        )
        self._argv = tuple(argv)
        self._id_prefix = id_prefix or worker_id_prefix()
        self._supervisor_id = supervisor_id
        self._interest = interest if interest is not None else Interest(wanted=True)
        self._timings = timings or ChildTimings()
        self._stopping = trio.Event()
        self._hurry = trio.Event()
        self._incarnation = 0
        self._current: WorkerProcess | None = None
        self._restarts = 0
        self._fast_crashes = 0
        self._last_exit_code: int | None = None
        self._last_error: str | None = None
        self._completed_before = 0
        self._failed_before = 0

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Graceful stop: SIGTERM the current process, restart nothing; :meth:`run` returns once
        it exited. Idempotent."""
        self._stopping.set()

    def hurry(self) -> None:
        """Second signal: the current process gets SIGUSR1 (cancel jobs now) and
        ``hurry_grace`` seconds before SIGKILL. Implies :meth:`request_stop`."""
        self.request_stop()
        self._hurry.set()

    @property
    def worker_id(self) -> str | None:
        """The current process's worker id (``None`` before the first spawn)."""
        return self._current.worker_id if self._current is not None else None

    def statistics(self) -> ChildStatistics:
        proc = self._current
        return ChildStatistics(
            index=self.index,
            worker_id=self.worker_id,
            pid=proc.pid if proc is not None else None,
            alive=proc is not None and proc.alive,
            started_at=proc.started_at if proc is not None else None,
            last_heartbeat=proc.last_message if proc is not None else None,
            restarts=self._restarts,
            fast_crashes=self._fast_crashes,
            last_exit_code=self._last_exit_code,
            jobs_running=proc.running if proc is not None else 0,
            jobs_completed=self._completed_before + (proc.completed if proc else 0),
            jobs_failed=self._failed_before + (proc.failed if proc else 0),
            jobs_claimed=proc.claimed if proc is not None else 0,
        )

    # ------------------------------------------------------------------ service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a worker process running until stopped. ``started`` is reported once the first
        process is spawned (or its spawn failed and a retry is scheduled). Returns after
        :meth:`request_stop` when the process has exited; on cancellation, terminates the
        process before the cancellation propagates."""
        delay = self._timings.backoff_initial
        reported = False
        while not self._stopping.is_set():
            spawned_at = trio.current_time()
            exit_code = await self._run_once(task_status if not reported else None)
            reported = True
            if self._stopping.is_set():
                break
            lived = trio.current_time() - spawned_at
            if lived >= self._timings.healthy_lifetime:
                delay = self._timings.backoff_initial
                self._fast_crashes = 0
            else:
                self._fast_crashes += 1
            self._restarts += 1
            self._log_crash(exit_code, lived, delay)
            with trio.move_on_after(delay):
                await self._stopping.wait()
            if self._fast_crashes:
                delay = min(delay * 2, self._timings.backoff_max)
        if not reported:
            task_status.started()

    def _log_crash(self, exit_code: int | None, lived: float, delay: float) -> None:
        alarm = self._fast_crashes >= FAST_CRASH_ALARM_COUNT
        if alarm:
            cause = self._last_error or "see the worker's log above"
            extra = (
                f" ({self._fast_crashes} crashes in a row within "
                f"{self._timings.healthy_lifetime:g} s of starting: {cause})"
            )
        else:
            extra = f": {self._last_error}" if self._last_error else ""
        logger.log(
            logging.ERROR if alarm else logging.WARNING,
            "worker %s ended unexpectedly (%s) after %.1f s; restarting in %.1f s%s",
            self.worker_id,
            _describe_exit(exit_code),
            lived,
            delay,
            extra,
        )

    def _environment(self, worker_id: str) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if k not in _CHILD_SECRETS},
            **{k: v for k, v in self._config.to_env().items() if k not in _CHILD_SECRETS},
            "DATABASE_URL": self._database_url,
            "QDWORKER_WORKER_ID": worker_id,
            "QDWORKER_WORKER_SLOT": str(self.index),
            "QDWORKER_WORKER_RESTARTS": str(self._restarts),
            **({"QDWORKER_SUPERVISOR_ID": self._supervisor_id} if self._supervisor_id else {}),
        }

    async def _run_once(self, task_status: trio.TaskStatus[None] | None) -> int | None:
        """Run one process to its end; returns its exit code (``None``: never spawned)."""
        self._incarnation += 1
        worker_id = f"{self._id_prefix}:w{self.index}.{self._incarnation}"
        if self._current is not None:
            self._completed_before += self._current.completed
            self._failed_before += self._current.failed
        proc = self._current = WorkerProcess(
            worker_id, self._argv, self._environment(worker_id), on_message=self._on_message,
            interest=self._interest, shutdown_timeout=self._config.shutdown_timeout,
            timings=self._timings, stopping=self._stopping, hurry=self._hurry,
            on_tally=self._on_tally,
        )  # fmt: skip
        try:
            exit_code = await proc.run(task_status=task_status or trio.TASK_STATUS_IGNORED)
        finally:
            exit_code = proc.process.returncode if proc.process is not None else None
            self._last_exit_code = exit_code
            if proc.last_error is not None or exit_code == 0:
                self._last_error = proc.last_error
            if exit_code == 0:
                logger.info("worker %s exited cleanly", worker_id)
            if exit_code is not None:
                with trio.CancelScope(shield=True):
                    await self._release_quietly(worker_id, exit_code)
        return exit_code

    async def _release_quietly(self, worker_id: str, exit_code: int) -> None:
        clean = exit_code == 0
        try:
            with trio.fail_after(RELEASE_TIMEOUT_SECONDS):
                released = await self._release(worker_id, signal_name(exit_code))
        except Exception as exc:
            logger.log(
                logging.DEBUG if clean else logging.WARNING,
                "could not release the jobs of worker %s (%s); their leases expire on their own",
                worker_id,
                redact(str(exc)),
            )
            return
        if released:
            logger.warning(
                "worker %s ended with %d running job(s): released them for other workers",
                worker_id,
                released,
            )


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "could not be started"
    killed_by = signal_name(code)
    return f"killed by {killed_by}" if killed_by else f"exit code {code}"
