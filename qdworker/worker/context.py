"""What a handler gets: ``ctx.job``, ``ctx.log``, ``ctx.db``, ``ctx.notify_user`` and
``ctx.broadcast``."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from ..db.connection import Connection, connect
from ..model import Job
from .outbox import Outbox

__all__ = ["MAX_MESSAGE_BYTES", "JobContext", "JobDatabase"]

#: Parent of every job's logger adapter.
JOB_LOGGER = logging.getLogger("qdworker.job")
#: Largest message a job may send to users, as JSON.
MAX_MESSAGE_BYTES = 64 * 1024


class JobDatabase:
    """SQL for handlers, on the job's database: ``rows = await ctx.db.execute(sql, params)``.

    Connections are opened on first use and kept (at most ``size``, one per concurrently
    running statement); each statement autocommits. Owned by the worker; closed at exit.
    """

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._idle: list[Connection] = []
        self._slots = trio.Semaphore(size)

    @property
    def url(self) -> str:
        """The job database's URL, for handlers that need a connection of their own (for
        example to hold a transaction across statements)."""
        return self._url

    async def execute(
        self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> list[dict[str, Any]]:
        async with self._slots:
            conn = (
                self._idle.pop()
                if self._idle
                else await connect(self._url, application_name="qdworker-job")
            )
            try:
                rows = await conn.execute(sql, params)
            except BaseException:
                await conn.aclose()
                raise
            self._idle.append(conn)
            return rows

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()


def _check_message(message: Any) -> None:
    if not isinstance(message, Mapping):
        raise TypeError("a user message must be a JSON object, e.g. {'type': ..., 'data': ...}")
    size = len(json.dumps(message, allow_nan=False))
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message is {size} bytes as JSON; the limit is {MAX_MESSAGE_BYTES}")


class JobContext:
    """The handler's view of its job and of the worker (trio coroutines)."""

    def __init__(self, job: Job, db: JobDatabase, outbox: Outbox, worker_id: str) -> None:
        self.job = job
        self.db = db
        self.worker_id = worker_id
        self._outbox = outbox

    @functools.cached_property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the job's id and type (and the worker's id)."""
        return logging.LoggerAdapter(JOB_LOGGER, {"job_id": self.job.id, "job_type": self.job.type})

    async def notify_user(self, user_id: int, message: Mapping[str, Any]) -> None:
        """Send ``message`` to websocket clients of ``user_id`` (through the supervisor)."""
        _check_message(message)
        await self._outbox.send(
            {"kind": "send-to-user", "user_id": int(user_id), "message": message}
        )

    async def broadcast(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` to every websocket client."""
        _check_message(message)
        await self._outbox.send({"kind": "broadcast", "message": message})


class AsyncioJobContext(JobContext):
    """The context given to ``runtime="asyncio"`` handlers: the same API as asyncio coroutines."""

    def __init__(self, base: JobContext) -> None:
        super().__init__(base.job, base.db, base._outbox, base.worker_id)
        import trio_asyncio

        self.db = _AsyncioDatabase(base.db)  # type: ignore[assignment]
        self.notify_user = trio_asyncio.trio_as_aio(base.notify_user)  # type: ignore[method-assign]
        self.broadcast = trio_asyncio.trio_as_aio(base.broadcast)  # type: ignore[method-assign]


class _AsyncioDatabase:
    def __init__(self, db: JobDatabase) -> None:
        import trio_asyncio

        self.execute = trio_asyncio.trio_as_aio(db.execute)
        self.url = db.url
