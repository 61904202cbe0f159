"""One run of a worker process: :class:`WorkerProcess` (a :class:`~.children.Child` slot runs
one after another).

:meth:`WorkerProcess.run` spawns the process (``trio.run_process``, its own session, the IPC
socket passed by fd), reads its frames, tells it whether job events are wanted, watches its
heartbeats, and stops it when asked; it returns the exit code once the process is gone.

Resources: one nursery owns the process and three watchers. The IPC reader outlives the
process so the last frames (``worker-shutdown``, final ``job-events``) are read: it gets
:data:`IPC_DRAIN_SECONDS` after the exit to reach EOF (a grandchild that inherited the socket
cannot keep it open longer).

Stopping (the slot's ``stopping`` event, or cancellation of :meth:`run`): SIGTERM, then up to
``shutdown_timeout`` + ``stop_margin`` seconds, then SIGKILL to the process group. ``hurry``
(a second signal) sends SIGUSR1 (the worker cancels its jobs at once) and shortens the wait to
``hurry_grace``. Cancellation waits for the process to exit (shielded, bounded by the same
escalation), so no process outlives :meth:`run`. A process whose heartbeats stop for
``heartbeat_timeout`` seconds while it lives (or that sends nothing for ``startup_timeout``
after spawning) is SIGKILLed. Errors of ``on_message`` are logged and never stop the reader.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import trio

from .. import _protocol as protocol
from .._logs import module_logger

logger = module_logger(__name__)

#: Time the IPC reader gets after the process exited to read the remaining frames.
IPC_DRAIN_SECONDS: Final = 2.0

#: ``on_message(worker_id, msg)``: receives ``send-to-user``, ``broadcast``, ``job-events``
#: and unknown kinds. Called synchronously from the reader task; must not block.
MessageHandler = Callable[[str, Mapping[str, Any]], object]
#: ``on_tally(tally)``: a heartbeat's ``tally`` (unchecked); called from the reader task.
TallyHandler = Callable[[Any], object]


@dataclass(frozen=True)
class ProcessTimings:
    """How patient the supervisor is with a worker process (seconds)."""

    #: No heartbeat for this long while the process lives: it is SIGKILLed and replaced.
    heartbeat_timeout: float = 30.0
    #: Time a new process gets to send its first message before it is considered hung.
    startup_timeout: float = 60.0
    #: Added to ``shutdown_timeout`` before a stopping process is SIGKILLed (it cancels its
    #: jobs at ``shutdown_timeout`` and needs a moment to release them and exit).
    stop_margin: float = 5.0
    #: After SIGUSR1 (``hurry``), time the process gets before SIGKILL.
    hurry_grace: float = 3.0


class Interest:
    """Whether anybody wants job events (a websocket client here, or on another supervisor).

    Workers skip building job events while nobody does: at full speed that is most of the
    IPC traffic. Processes are told of every change (``{"kind": "events", "wanted": …}``).
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


class WorkerProcess:
    """One worker process, from spawn to exit; see the module docstring. ``stopping`` and
    ``hurry`` are the slot's (set once, they stay set)."""

    def __init__(
        self,
        worker_id: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        on_message: MessageHandler,
        interest: Interest,
        shutdown_timeout: float,
        timings: ProcessTimings,
        stopping: trio.Event,
        hurry: trio.Event,
        on_tally: TallyHandler | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._on_tally = on_tally
        self._argv = list(argv)
        self._env = dict(env)
        self._on_message = on_message
        self._interest = interest
        self._shutdown_timeout = shutdown_timeout
        self._timings = timings
        self._stopping = stopping
        self._hurry = hurry
        self.process: trio.Process | None = None
        self.started_at: datetime | None = None
        self.last_message: float | None = None  # trio clock
        self.last_error: str | None = None  # why it said it cannot start
        self.running = self.claimed = self.completed = self.failed = 0
        self._message_seen = trio.Event()
        self._kill_at: float | None = None
        self._hurried = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> int | None:
        """Run the process to its end; returns its exit code (``None``: it could not be
        spawned, which is logged). ``started`` once it is spawned, or its spawn failed."""
        parent_stream, child_sock = protocol.socketpair()
        env = {**self._env, **protocol.ipc_env(child_sock)}
        async with parent_stream, trio.open_nursery() as nursery:
            # Shielded: under cancellation it still reads the frames the process sends while
            # it shuts down; cancelled explicitly once the process exited and was drained.
            reader = trio.CancelScope(shield=True)
            reader_done = trio.Event()
            nursery.start_soon(self._read, parent_stream, reader, reader_done)
            proc = await self._spawn(nursery, env, child_sock)
            task_status.started()
            if proc is None:
                reader.cancel()
                return None
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
                    reader.cancel()
        return proc.returncode

    async def _spawn(
        self, nursery: trio.Nursery, env: dict[str, str], child_sock: socket.socket
    ) -> trio.Process | None:
        try:
            proc: trio.Process = await nursery.start(
                partial(
                    trio.run_process, self._argv, check=False, stdin=subprocess.DEVNULL,
                    env=env, pass_fds=(child_sock.fileno(),), start_new_session=True,
                    deliver_cancel=self._terminate,
                )
            )  # fmt: skip
        except OSError as exc:
            logger.error("cannot start worker %s: %s", self.worker_id, exc)  # noqa: TRY400
            return None
        finally:
            child_sock.close()
        self.process = proc
        self.started_at = datetime.now(UTC)
        logger.debug("worker %s spawned (pid %d)", self.worker_id, proc.pid)
        return proc

    async def _tell_interest(self, stream: trio.SocketStream) -> None:
        """Tell the process whether job events are wanted, now and at every change. The only
        writer of ``stream``; a process that is gone is left to the exit handling."""
        try:
            while True:
                wanted = self._interest.wanted
                await protocol.send(stream, protocol.events_wanted(wanted))
                if wanted == self._interest.wanted:
                    await self._interest.wait_changed()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _stop_when_asked(self, proc: trio.Process) -> None:
        """When the slot stops: terminate the process (heartbeats no longer matter)."""
        await self._stopping.wait()
        await self._terminate(proc)

    async def _terminate(self, proc: trio.Process) -> None:
        """SIGTERM, wait, SIGKILL the process group; ``hurry`` sends SIGUSR1 and shortens the
        wait. Safe to run twice at once (a stop and cancellation): the signals and the deadline
        are per process. As ``deliver_cancel`` it runs shielded and trio cancels it as soon as
        the process exits."""
        if proc.returncode is not None:
            return
        if self._kill_at is None:
            timeout = self._shutdown_timeout + self._timings.stop_margin
            logger.debug("worker %s: SIGTERM, SIGKILL in %.1f s", self.worker_id, timeout)
            self._kill_at = trio.current_time() + timeout
            proc.send_signal(signal.SIGTERM)
        while proc.returncode is None and trio.current_time() < self._kill_at:
            with trio.move_on_at(self._kill_at):
                await self._hurry.wait()
            if self._hurry.is_set() and not self._hurried and proc.returncode is None:
                self._hurried = True
                # SIGUSR1, not a second SIGTERM: trio coalesces a signal that arrives again
                # before it was read, so two quick SIGTERMs could look like one.
                logger.info("worker %s: SIGUSR1 (cancel running jobs now)", self.worker_id)
                proc.send_signal(signal.SIGUSR1)
                grace = trio.current_time() + self._timings.hurry_grace
                self._kill_at = min(self._kill_at, grace)
            if self._hurry.is_set():
                await trio.sleep_until(self._kill_at)
        if proc.returncode is None:
            logger.warning(
                "worker %s (pid %d) did not exit in time: SIGKILL", self.worker_id, proc.pid
            )
            kill_group(proc)

    async def _watch_heartbeats(self, proc: trio.Process) -> None:
        """SIGKILL the process if its messages stop while it lives (not while stopping)."""
        spawned = trio.current_time()
        while proc.returncode is None and not self._stopping.is_set():
            if self.last_message is None:
                deadline = spawned + self._timings.startup_timeout
            else:
                deadline = self.last_message + self._timings.heartbeat_timeout
            if trio.current_time() < deadline:
                self._message_seen = trio.Event()
                with trio.move_on_at(deadline):
                    await self._message_seen.wait()
                continue
            logger.error(
                "worker %s (pid %d) sent no heartbeat for %.1f s: killing it (SIGKILL) to"
                " replace it; a job handler is probably blocking its event loop",
                self.worker_id,
                proc.pid,
                trio.current_time() - (self.last_message or spawned),
            )
            kill_group(proc)
            return

    async def _read(
        self, stream: trio.SocketStream, scope: trio.CancelScope, done: trio.Event
    ) -> None:
        try:
            with scope:
                messages = protocol.frames(stream)
                try:
                    async for msg in messages:
                        self._handle(msg)
                finally:
                    await _aclose(messages)
        finally:
            done.set()

    def _handle(self, msg: Mapping[str, Any]) -> None:
        kind = msg["kind"]
        self.last_message = trio.current_time()
        self._message_seen.set()
        if kind == protocol.HEARTBEAT:
            self.running = _count(msg.get("running"))
            self.claimed = _count(msg.get("claimed"))
            self.completed = _count(msg.get("completed"))
            self.failed = _count(msg.get("failed"))
            if self._on_tally is not None and msg.get("tally"):
                self._on_tally(msg["tally"])
        elif kind == protocol.WORKER_STARTED:
            logger.info("worker %s started (pid %s)", self.worker_id, msg.get("pid"))
        elif kind == protocol.WORKER_SHUTDOWN:
            logger.info("worker %s is shutting down", self.worker_id)
        elif kind == protocol.WORKER_ERROR:
            self.last_error = str(msg.get("error"))[:500]
            logger.error("worker %s cannot start: %s", self.worker_id, self.last_error)
        if kind in protocol.LIFECYCLE_KINDS:
            return
        try:
            self._on_message(self.worker_id, msg)
        except Exception:
            logger.exception("handling %r from worker %s failed", kind, self.worker_id)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(int(value), 0)


def kill_group(proc: trio.Process) -> None:
    """SIGKILL the process's group (it leads its own session), else the process."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
