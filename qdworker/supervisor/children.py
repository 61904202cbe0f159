"""One worker child process, kept alive by the supervisor: :class:`Child`.

:meth:`Child.run` is a service (``await nursery.start(child.run)``): it spawns
``python -m qdworker.worker`` (or the ``argv`` given) in its own session, reads its IPC frames,
watches its heartbeats and restarts it when it ends, until :meth:`Child.request_stop` or
cancellation.

Lifecycle and resources, per incarnation:

* One inner nursery owns the process (``trio.run_process``), the IPC reader and the heartbeat
  watch. The reader outlives the process so the last frames (``worker-shutdown``, final
  ``job-events``) are read; it gets :data:`IPC_DRAIN_SECONDS` after the exit to reach EOF (a
  grandchild that inherited the socket cannot keep it open longer).
* Each incarnation has its own worker id,
  ``{host}:{supervisor pid}:{random}:w{index}.{incarnation}``, which the child uses as
  ``lease_owner``. The random part differs in every supervisor, so a supervisor restarted in a
  container (same host name, same pid) never takes its predecessor's id.
* Stopping (:meth:`request_stop`, or cancellation of :meth:`run`): SIGTERM, then up to
  ``shutdown_timeout`` + ``stop_margin`` seconds, then SIGKILL to the child's process group.
  :meth:`hurry` (a second signal) sends SIGUSR1 (the child cancels its jobs at once)
  and shortens the wait to :data:`HURRY_GRACE_SECONDS`. Cancellation waits for the process to
  exit (shielded, bounded by the same escalation), so no child outlives :meth:`run`.
* A child whose heartbeats stop for ``heartbeat_timeout`` seconds while it lives (or that sends
  nothing for :data:`STARTUP_TIMEOUT_SECONDS` after spawning) is SIGKILLed and replaced.
* Once the child is gone, the leases it still held (none after a clean shutdown, which
  releases them itself, except those of handlers that ignored cancellation) are ended at once
  (``release_worker_leases``, which also wakes the other workers) so other workers can claim
  them. Failure to do so is logged (warning) and harmless: the leases then expire on their own.
* Restarts back off exponentially from :data:`RESTART_BACKOFF_INITIAL_SECONDS` to
  :data:`RESTART_BACKOFF_MAX_SECONDS`; the delay resets after a child lived
  :data:`HEALTHY_LIFETIME_SECONDS`. From :data:`FAST_CRASH_ALARM_COUNT` fast crashes in a row on,
  each is logged at error level.

Errors: a child that cannot be spawned at all (``OSError``) counts as a crash and is retried
with the same backoff; errors of ``on_message`` are logged and never stop the reader. A child
that cannot start reports why (``worker-error``): the crash lines repeat that reason.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import trio

from .. import protocol
from .._redact import redact
from ..config import Config
from ..db import store
from ..db.connect import DbOptions
from ..db.connection import Link

__all__ = [
    "DEFAULT_WORKER_ARGV",
    "FAST_CRASH_ALARM_COUNT",
    "HEALTHY_LIFETIME_SECONDS",
    "HEARTBEAT_TIMEOUT_SECONDS",
    "HURRY_GRACE_SECONDS",
    "IPC_DRAIN_SECONDS",
    "RELEASE_TIMEOUT_SECONDS",
    "RESTART_BACKOFF_INITIAL_SECONDS",
    "RESTART_BACKOFF_MAX_SECONDS",
    "STARTUP_TIMEOUT_SECONDS",
    "STOP_MARGIN_SECONDS",
    "Child",
    "ChildStatistics",
    "Interest",
    "MessageHandler",
    "ReleaseLeases",
    "release_leases",
    "worker_id_prefix",
]

logger = logging.getLogger(__name__)

#: The worker child's command line.
DEFAULT_WORKER_ARGV: Final = (sys.executable, "-m", "qdworker.worker")

#: First restart delay after a crash.
RESTART_BACKOFF_INITIAL_SECONDS: Final = 0.5
#: Longest restart delay (the delay doubles per fast crash up to this).
RESTART_BACKOFF_MAX_SECONDS: Final = 30.0
#: A child that lived this long was healthy: the next restart delay starts over.
HEALTHY_LIFETIME_SECONDS: Final = 10.0
#: From this many fast crashes in a row on, each crash is logged at error level.
FAST_CRASH_ALARM_COUNT: Final = 3
#: No heartbeat for this long while the child lives: it is SIGKILLed and replaced.
HEARTBEAT_TIMEOUT_SECONDS: Final = 30.0
#: Settings a worker never needs, kept out of its environment (job code runs there).
_CHILD_SECRETS: Final = frozenset({"QDWORKER_WS_SECRET"})
#: Time a new child gets to send its first message before it is considered hung.
STARTUP_TIMEOUT_SECONDS: Final = 60.0
#: Added to ``shutdown_timeout`` before a stopping child is SIGKILLed (the child itself
#: cancels its jobs at ``shutdown_timeout`` and needs a moment to release them and exit).
STOP_MARGIN_SECONDS: Final = 5.0
#: After SIGUSR1 (``hurry``), time the child gets before SIGKILL.
HURRY_GRACE_SECONDS: Final = 3.0
#: Time the IPC reader gets after the process exited to read the remaining frames.
IPC_DRAIN_SECONDS: Final = 2.0
#: Bound on releasing a dead child's leases (connect + one UPDATE).
RELEASE_TIMEOUT_SECONDS: Final = 10.0

#: ``on_message(worker_id, msg)``: receives ``send-to-user``, ``broadcast``, ``job-events``
#: and unknown kinds. Called synchronously from the reader task; must not block.
MessageHandler = Callable[[str, Mapping[str, Any]], object]
#: ``release(worker_id)``: end the leases of that worker's unfinished jobs; returns the count.
ReleaseLeases = Callable[[str], Awaitable[int]]


def worker_id_prefix() -> str:
    """A new ``{hostname}:{pid}:{random}``: a supervisor's id, and the part of worker ids its
    children share. The random part makes it unique even where host names and pids repeat
    (containers) and when one process runs several supervisors."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def release_leases(database_url: str, options: DbOptions, worker_id: str) -> int:
    """End the leases of ``worker_id``'s unfinished jobs (``release_worker_leases``) on a
    connection of its own; returns how many jobs. Raises
    :class:`~qdworker.errors.DatabaseError` if the database cannot be reached."""
    async with Link(database_url, "supervisor", options, persistent=False) as link:
        return await link.run(lambda raw: store.release_worker_leases(raw, worker_id))


def _default_on_message(worker_id: str, msg: Mapping[str, Any]) -> None:
    logger.debug("message from worker %s: %s", worker_id, msg.get("kind"))


@dataclass(frozen=True)
class ChildStatistics:
    """A snapshot of one child slot.

    ``started_at`` is the wall-clock (UTC) spawn time of the current incarnation;
    ``last_heartbeat`` is ``trio.current_time()`` of its last message (``None`` before the
    first). Job counters are summed over all incarnations of the slot; ``jobs_running`` and
    ``jobs_claimed`` are the current incarnation's last report.
    """

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


class Interest:
    """Whether anybody wants job events (a websocket client here, or on another supervisor).

    Workers skip building job events while nobody does: at full speed that is most of the
    IPC traffic. Children are told of every change (``{"kind": "events", "wanted": …}``).
    """

    def __init__(self, wanted: bool = False) -> None:
        self.wanted = wanted
        self._changed = trio.Event()

    def set(self, wanted: bool) -> None:
        if wanted != self.wanted:
            self.wanted = wanted
            self._changed.set()
            self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


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
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_SECONDS,
        startup_timeout: float = STARTUP_TIMEOUT_SECONDS,
        stop_margin: float = STOP_MARGIN_SECONDS,
        hurry_grace: float = HURRY_GRACE_SECONDS,
        backoff_initial: float = RESTART_BACKOFF_INITIAL_SECONDS,
        backoff_max: float = RESTART_BACKOFF_MAX_SECONDS,
        healthy_lifetime: float = HEALTHY_LIFETIME_SECONDS,
    ) -> None:
        self._config = config
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
        self._heartbeat_timeout = heartbeat_timeout
        self._startup_timeout = startup_timeout
        self._stop_margin = stop_margin
        self._hurry_grace = hurry_grace
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._healthy_lifetime = healthy_lifetime

        self._stopping = trio.Event()
        self._hurry = trio.Event()
        self._incarnation = 0
        self._worker_id: str | None = None
        self._process: trio.Process | None = None
        self._started_at: datetime | None = None
        self._last_message: float | None = None
        self._restarts = 0
        self._fast_crashes = 0
        self._last_exit_code: int | None = None
        self._kill_at: float | None = None
        self._hurried = False
        self._message_seen = trio.Event()
        self._last_error: str | None = None
        self._running = 0
        self._claimed = 0
        self._completed_before = 0
        self._failed_before = 0
        self._completed = 0
        self._failed = 0

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Graceful stop: SIGTERM the current process, restart nothing; :meth:`run` returns once
        it exited. Idempotent."""
        if not self._stopping.is_set():
            self._stopping.set()

    def hurry(self) -> None:
        """Second signal: the current process gets SIGUSR1 (cancel jobs now) and
        :data:`HURRY_GRACE_SECONDS` before SIGKILL. Implies :meth:`request_stop`."""
        self.request_stop()
        if not self._hurry.is_set():
            self._hurry.set()

    @property
    def worker_id(self) -> str | None:
        """The current incarnation's worker id (``None`` before the first spawn)."""
        return self._worker_id

    def statistics(self) -> ChildStatistics:
        proc = self._process
        return ChildStatistics(
            index=self.index,
            worker_id=self._worker_id,
            pid=proc.pid if proc is not None else None,
            alive=proc is not None and proc.returncode is None,
            started_at=self._started_at,
            last_heartbeat=self._last_message,
            restarts=self._restarts,
            fast_crashes=self._fast_crashes,
            last_exit_code=self._last_exit_code,
            jobs_running=self._running,
            jobs_completed=self._completed_before + self._completed,
            jobs_failed=self._failed_before + self._failed,
            jobs_claimed=self._claimed,
        )

    # ------------------------------------------------------------------ service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a worker process running until stopped. ``started`` is reported once the first
        process is spawned (or its spawn failed and a retry is scheduled). Returns after
        :meth:`request_stop` when the process has exited; on cancellation, terminates the
        process (see the module docstring) before the cancellation propagates."""
        delay = self._backoff_initial
        reported = False
        while not self._stopping.is_set():
            spawned_at = trio.current_time()
            exit_code = await self._run_once(task_status if not reported else None)
            reported = True
            if self._stopping.is_set():
                break
            lived = trio.current_time() - spawned_at
            if lived >= self._healthy_lifetime:
                delay = self._backoff_initial
                self._fast_crashes = 0
            else:
                self._fast_crashes += 1
            self._restarts += 1
            alarm = self._fast_crashes >= FAST_CRASH_ALARM_COUNT
            level = logging.ERROR if alarm else logging.WARNING
            cause = self._last_error or "see the worker's log above"
            extra = (
                f" ({self._fast_crashes} crashes in a row within {self._healthy_lifetime:g} s of"
                f" starting: {cause})"
                if alarm
                else (f": {self._last_error}" if self._last_error else "")
            )
            logger.log(
                level,
                "worker %s ended unexpectedly (%s) after %.1f s; restarting in %.1f s%s",
                self._worker_id,
                _describe_exit(exit_code),
                lived,
                delay,
                extra,
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()
            if self._fast_crashes:
                delay = min(delay * 2, self._backoff_max)
        if not reported:
            task_status.started()

    async def _run_once(self, task_status: trio.TaskStatus[None] | None) -> int | None:
        """Run one incarnation to its end; returns its exit code (``None``: never spawned)."""
        self._incarnation += 1
        worker_id = f"{self._id_prefix}:w{self.index}.{self._incarnation}"
        self._worker_id = worker_id
        self._process = None
        self._started_at = None
        self._last_message = None
        self._kill_at = None
        self._hurried = False
        parent_stream, child_sock = protocol.socketpair()
        env = {
            **{k: v for k, v in os.environ.items() if k not in _CHILD_SECRETS},
            **{k: v for k, v in self._config.to_env().items() if k not in _CHILD_SECRETS},
            "DATABASE_URL": self._database_url,
            **protocol.ipc_env(child_sock),
            "QDWORKER_WORKER_ID": worker_id,
            **({"QDWORKER_SUPERVISOR_ID": self._supervisor_id} if self._supervisor_id else {}),
        }
        proc: trio.Process | None = None
        try:
            async with parent_stream, trio.open_nursery() as nursery:
                # Shielded: under cancellation it still reads the frames the child sends while
                # it shuts down; cancelled explicitly once the process exited and was drained.
                reader_scope = trio.CancelScope(shield=True)
                reader_done = trio.Event()
                nursery.start_soon(
                    self._read_ipc, parent_stream, worker_id, reader_scope, reader_done
                )
                try:
                    proc = await nursery.start(
                        partial(
                            trio.run_process,
                            list(self._argv),
                            check=False,
                            stdin=subprocess.DEVNULL,
                            env=env,
                            pass_fds=(child_sock.fileno(),),
                            start_new_session=True,
                            deliver_cancel=self._terminate,
                        )
                    )
                except OSError as exc:
                    logger.error("cannot start worker %s: %s", worker_id, exc)  # noqa: TRY400
                    reader_scope.cancel()
                    if task_status is not None:
                        task_status.started()
                    return None
                finally:
                    child_sock.close()
                assert proc is not None
                self._process = proc
                self._started_at = datetime.now(UTC)
                logger.debug("worker %s spawned (pid %d)", worker_id, proc.pid)
                if task_status is not None:
                    task_status.started()
                try:
                    async with trio.open_nursery() as watchers:
                        watchers.start_soon(self._watch_heartbeats, proc)
                        watchers.start_soon(self._tell_interest, parent_stream)
                        watchers.start_soon(self._stop_when_asked, proc)
                        await proc.wait()
                        watchers.cancel_scope.cancel()
                finally:
                    with trio.CancelScope(shield=True):
                        # Bounded: on cancellation run_process delivers _terminate (SIGKILL last).
                        await proc.wait()
                        with trio.move_on_after(IPC_DRAIN_SECONDS):
                            await reader_done.wait()
                        reader_scope.cancel()
        finally:
            self._completed_before += self._completed
            self._failed_before += self._failed
            self._completed = self._failed = self._running = self._claimed = 0
            exit_code = proc.returncode if proc is not None else None
            self._last_exit_code = exit_code
            if exit_code == 0:
                logger.info("worker %s exited cleanly", worker_id)
            if exit_code is not None:
                with trio.CancelScope(shield=True):
                    await self._release_quietly(worker_id, clean=exit_code == 0)
        return exit_code

    async def _tell_interest(self, stream: trio.SocketStream) -> None:
        """Tell the child whether job events are wanted, now and at every change. The only
        writer of ``stream``; a child that is gone is left to the exit handling."""
        try:
            while True:
                wanted = self._interest.wanted
                await protocol.send(stream, protocol.events_wanted(wanted))
                if wanted == self._interest.wanted:
                    await self._interest.wait_changed()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _stop_when_asked(self, proc: trio.Process) -> None:
        """On :meth:`request_stop`: terminate the process (heartbeats no longer matter)."""
        await self._stopping.wait()
        await self._terminate(proc)

    async def _terminate(self, proc: trio.Process) -> None:
        """SIGTERM, wait, SIGKILL the process group; :meth:`hurry` sends SIGUSR1 and
        shortens the wait. Safe to run twice at once (request_stop and cancellation): the
        signals and the deadline are per process. As ``deliver_cancel`` it runs shielded and
        trio cancels it as soon as the process exits."""
        if proc.returncode is not None:
            return
        if self._kill_at is None:
            timeout = self._config.shutdown_timeout + self._stop_margin
            logger.debug("worker %s: SIGTERM, SIGKILL in %.1f s", self._worker_id, timeout)
            self._kill_at = trio.current_time() + timeout
            proc.send_signal(signal.SIGTERM)
        while proc.returncode is None and trio.current_time() < self._kill_at:
            with trio.move_on_at(self._kill_at):
                await self._hurry.wait()
            if self._hurry.is_set() and not self._hurried and proc.returncode is None:
                self._hurried = True
                # SIGUSR1, not a second SIGTERM: trio coalesces a signal that arrives again
                # before it was read, so two quick SIGTERMs could look like one.
                logger.info("worker %s: SIGUSR1 (cancel running jobs now)", self._worker_id)
                proc.send_signal(signal.SIGUSR1)
                self._kill_at = min(self._kill_at, trio.current_time() + self._hurry_grace)
            if self._hurry.is_set():
                await trio.sleep_until(self._kill_at)
        if proc.returncode is None:
            logger.warning(
                "worker %s (pid %d) did not exit in time: SIGKILL", self._worker_id, proc.pid
            )
            _kill_group(proc)

    async def _watch_heartbeats(self, proc: trio.Process) -> None:
        """SIGKILL the process if its messages stop while it lives (not while stopping)."""
        spawned = trio.current_time()
        while proc.returncode is None and not self._stopping.is_set():
            if self._last_message is None:
                deadline = spawned + self._startup_timeout
            else:
                deadline = self._last_message + self._heartbeat_timeout
            if trio.current_time() < deadline:
                self._message_seen = trio.Event()
                with trio.move_on_at(deadline):
                    await self._message_seen.wait()
                continue
            logger.error(
                "worker %s (pid %d) sent no heartbeat for %.1f s: killing it (SIGKILL) to"
                " replace it; a job handler is probably blocking its event loop",
                self._worker_id,
                proc.pid,
                trio.current_time() - (self._last_message or spawned),
            )
            _kill_group(proc)
            return

    async def _read_ipc(
        self,
        stream: trio.SocketStream,
        worker_id: str,
        scope: trio.CancelScope,
        done: trio.Event,
    ) -> None:
        try:
            with scope:
                messages = protocol.frames(stream)
                try:
                    async for msg in messages:
                        self._handle(worker_id, msg)
                finally:
                    await _aclose(messages)
        finally:
            done.set()

    def _handle(self, worker_id: str, msg: Mapping[str, Any]) -> None:
        kind = msg["kind"]
        if worker_id == self._worker_id:
            self._last_message = trio.current_time()
            self._message_seen.set()
        if kind == protocol.HEARTBEAT:
            self._running = _count(msg.get("running"))
            self._claimed = _count(msg.get("claimed"))
            self._completed = _count(msg.get("completed"))
            self._failed = _count(msg.get("failed"))
        elif kind == protocol.WORKER_STARTED:
            self._last_error = None
            logger.info("worker %s started (pid %s)", worker_id, msg.get("pid"))
        elif kind == protocol.WORKER_SHUTDOWN:
            logger.info("worker %s is shutting down", worker_id)
        elif kind == protocol.WORKER_ERROR:
            self._last_error = str(msg.get("error"))[:500]
            logger.error("worker %s cannot start: %s", worker_id, self._last_error)
        if kind in protocol.LIFECYCLE_KINDS:
            return
        try:
            self._on_message(worker_id, msg)
        except Exception:
            logger.exception("handling %r from worker %s failed", kind, worker_id)

    async def _release_quietly(self, worker_id: str, *, clean: bool) -> None:
        try:
            with trio.fail_after(RELEASE_TIMEOUT_SECONDS):
                released = await self._release(worker_id)
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


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(int(value), 0)


def _kill_group(proc: trio.Process) -> None:
    """SIGKILL the child's process group (it leads its own session), else the child."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "could not be started"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
