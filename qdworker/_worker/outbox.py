"""The child's side of IPC: messages and job events to the supervisor, bounded.

Job events are coalesced into one ``job-events`` frame per flush (many per frame at full
speed). At most :data:`MAX_PENDING_EVENTS` wait; beyond that the oldest are dropped and
counted (events are best-effort; jobs are never slowed by a slow supervisor). Other messages
go through a bounded channel: :meth:`Outbox.send` waits when it is full.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Mapping
from typing import Any

import trio

from .. import _protocol as protocol
from .._logs import module_logger

logger = module_logger(__name__)

MAX_PENDING_EVENTS = 20_000
MAX_PENDING_MESSAGES = 1_000
#: Most events per frame (keeps frames far below protocol.MAX_FRAME_BYTES).
EVENTS_PER_FRAME = 500


class Outbox:
    """Owns the IPC stream (or none, when run without a supervisor)."""

    def __init__(self, stream: trio.SocketStream | None) -> None:
        self._stream = stream
        self._events: deque[dict[str, Any]] = deque()
        self._send, self._receive = trio.open_memory_channel[Mapping[str, Any]](
            MAX_PENDING_MESSAGES
        )
        self._wake = trio.Event()
        #: Whether anybody wants job events; the supervisor says so over the socket.
        self.events_wanted = False

    def event(self, event: dict[str, Any]) -> None:
        """Queue a job event (never blocks). Callers check :attr:`events_wanted` first, to
        skip building events nobody wants."""
        if self._stream is None or not self.events_wanted:
            return
        if len(self._events) >= MAX_PENDING_EVENTS:
            self._events.popleft()
        self._events.append(event)
        self._wake.set()

    async def send(self, msg: Mapping[str, Any]) -> None:
        """Queue a message; waits while :data:`MAX_PENDING_MESSAGES` are queued."""
        if self._stream is None:
            return
        protocol.encode_frame(msg)  # raises now, in the caller, for what cannot be sent
        await self._send.send(msg)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued messages until cancelled; then flush what is queued (bounded time)."""
        task_status.started()
        if self._stream is None:
            await trio.sleep_forever()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.warning("IPC stream to the supervisor is closed")
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1.0),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await self._flush()

    async def _flush(self) -> None:
        assert self._stream is not None
        while True:
            try:
                msg = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            await protocol.send(self._stream, msg)
        while self._events:
            batch = [
                self._events.popleft() for _ in range(min(EVENTS_PER_FRAME, len(self._events)))
            ]
            await protocol.send(self._stream, protocol.job_events(batch))

    async def receive(self) -> None:
        """Read the supervisor's messages until its end closes (it exited or was killed)."""
        if self._stream is None:
            await trio.sleep_forever()
            return
        async for msg in protocol.frames(self._stream):
            if msg["kind"] == protocol.EVENTS_WANTED:
                self.events_wanted = bool(msg.get("wanted"))
                if not self.events_wanted:
                    self._events.clear()
