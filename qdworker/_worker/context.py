"""What a handler gets: ``ctx.job``, ``ctx.log``, ``ctx.db``, ``ctx.transaction()``,
``ctx.notify_user``, ``ctx.broadcast`` and ``ctx.progress``.

``ctx.transaction()`` is how a handler's database writes happen exactly once::

    @job("transfer")
    async def transfer(ctx):
        async with ctx.transaction() as tx:
            await tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = %s", (1,))
            tx.result = {"moved": 10}   # optional: the job's result, committed with it

The block's statements and the job's completion (success, ``tx.result``, its next cron tick)
commit in one transaction, and only if this run still holds its claim (fenced by
``ctx.job.claims``); otherwise everything rolls back and :class:`~qdworker.errors.ClaimLostError`
is raised (the run is discarded: another worker has the job). A worker killed before the
commit leaves nothing behind; one killed after it leaves the job finished. A value the handler
returns after the block replaces the result (one more statement, not part of the guarantee).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import _protocol as protocol
from .._db import store
from .._db.connect import DbOptions
from .._db.connection import Connection, connect
from .._logs import for_job
from .._model import Job
from ..errors import ClaimLostError, DatabaseUnavailableError
from .outbox import Outbox
from .progress import REPORTED, ProgressWriter, Reported, RunProgress, progress_value
from .run import Outcome, Run

#: Parent of every job's logger adapter.
JOB_LOGGER = logging.getLogger("qdworker.job")

Params = Mapping[str, Any] | Sequence[Any] | None
#: Builds the completer's ``finish`` parameters for one run and its outcome.
FinishParams = Callable[[Run, Outcome], dict[str, Any]]


class JobDatabase:
    """SQL for handlers, on the job's database: ``rows = await ctx.db.execute(sql, params)``.

    Connections are opened on first use and kept (at most ``size``, one per concurrently
    running statement); each statement autocommits and has no statement timeout (the job's
    own timeout bounds it). A kept connection the server closed meanwhile is replaced before
    the statement is sent, so a database restart between two jobs is invisible to them; a
    statement cut off by a broken connection raises
    :class:`~qdworker.errors.OutcomeUnknownError`. Owned by the worker; closed at exit.
    """

    def __init__(self, url: str, size: int, options: DbOptions) -> None:
        self._url = url
        self._options = options
        self._idle: list[Connection] = []
        self._slots = trio.Semaphore(size)

    @property
    def url(self) -> str:
        """The job database's URL, for handlers that need a connection of their own."""
        return self._url

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection for a while (returned to the pool unless it broke)."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._open()
            try:
                yield conn
            except BaseException:
                await conn.aclose()
                raise
            if conn.closed:
                await conn.aclose()
            else:
                self._idle.append(conn)

    async def _open(self) -> Connection:
        return await connect(self._url, "job", self._options, statement_timeout=False)

    async def execute(self, sql: str, params: Params = None) -> list[dict[str, Any]]:
        for attempt in (1, 2):
            async with self.connection() as conn:
                try:
                    return await conn.execute(sql, params)
                except DatabaseUnavailableError:
                    if attempt == 2:  # closed while idle, and the new one too
                        raise
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()


class Transaction:
    """The handle of ``ctx.transaction()``: run statements in the job's transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        #: The job's result, stored when the transaction commits (JSON; default ``None``).
        self.result: Any = None

    async def execute(self, sql: str, params: Params = None) -> list[dict[str, Any]]:
        """Execute one statement in the transaction; its rows as dicts."""
        return await self._conn.execute(sql, params)


class JobContext:
    """The handler's view of its job and of the worker (trio coroutines)."""

    def __init__(
        self,
        run: Run,
        db: JobDatabase,
        outbox: Outbox,
        worker_id: str,
        finish_params: FinishParams,
        progress_writer: ProgressWriter | None = None,
    ) -> None:
        self.job: Job = run.job
        self.db = db
        self.worker_id = worker_id
        #: True once ``ctx.transaction()`` committed the job's completion.
        self.committed = False
        self._run = run
        self._outbox = outbox
        self._finish_params = finish_params
        self._progress_writer = progress_writer
        self._progress: RunProgress | None = None  # made on the first report
        self._parents: dict[int, Any] | None = None

    @property
    def fencing_token(self) -> int:
        """This run's fencing token (``job.claims``): with the job's id it names the run.
        ``SELECT qdworker_run_is_current(job_id, token)`` says whether it still holds the
        job; a system of your own can refuse writes carrying an older token."""
        return self.job.claims

    async def parents(self) -> Mapping[int, Any]:
        """The results of the jobs this one depends on (``depends_on``), by the id named
        there: the result of each parent's retry chain's last row (a parent that failed and
        succeeded on retry gives the retry's result; one that failed for good, its error).
        Read once, with one statement (``qdworker_parent_results``), then kept; empty for a
        job with no parents. Database errors propagate as from ``ctx.db.execute``."""
        if self._parents is None:
            if not self.job.depends_on:
                self._parents = {}
            else:
                rows = await self.db.execute(
                    "SELECT parent, result FROM qdworker_parent_results(%s)", [self.job.id]
                )
                self._parents = {int(row["parent"]): row["result"] for row in rows}
        return self._parents

    @functools.cached_property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the job's id and type (and the worker's id)."""
        return for_job(JOB_LOGGER, self.job)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A transaction whose commit also finishes this job, fenced by its claim (see the
        module docstring). Raises :class:`~qdworker.errors.ClaimLostError` (after rolling
        back) if the run no longer holds the job. Usable once per run."""
        if self.committed:
            raise RuntimeError("this job's transaction already committed")
        async with self.db.connection() as conn:
            await conn.execute("BEGIN")
            tx = Transaction(conn)
            try:
                yield tx
                await self._commit(conn, tx)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await _rollback(conn)
                raise

    async def _commit(self, conn: Connection, tx: Transaction) -> None:
        encoded = json.dumps(tx.result, allow_nan=False)
        params = self._finish_params(self._run, Outcome("succeeded", tx.result, encoded=encoded))
        result = await conn.run(lambda raw: store.finish(raw, params))
        if self.job.id not in result.finished:
            raise ClaimLostError(
                f"job {self.job.id}: this run no longer holds its claim; nothing was committed"
            )
        await conn.execute("COMMIT")
        self.committed = True

    async def notify_user(self, user_id: int, message: Mapping[str, Any]) -> None:
        """Send ``message`` to websocket clients of ``user_id`` (through the supervisor)."""
        protocol.check_message(message)
        await self._outbox.send(protocol.send_to_user(int(user_id), message))

    async def broadcast(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` to every websocket client."""
        protocol.check_message(message)
        await self._outbox.send(protocol.broadcast(message))

    def progress(self, fraction: float, message: str | None = None, data: Any = None) -> Reported:
        """Report how far the job got: ``await ctx.progress(0.4, "resizing", {"done": 4})``
        from a coroutine, ``ctx.progress(0.4)`` from a plain-def handler (its thread). Never
        waits: the latest value is stored in the row's ``progress`` (at most every 250 ms, the
        last one before the outcome) and sent as a ``progress`` job event (README, "Progress").

        Raises ``TypeError`` / ``ValueError`` for a fraction that is not a finite number in
        [0, 1], a message that is not a string of at most 1024 characters, or data that is not
        JSON of at most 16 KiB (only the call fails: catch it and the job goes on), and
        ``RuntimeError`` after the run ended. Without a worker (inline tests) the value is
        checked and dropped."""
        value = progress_value(fraction, message, data)
        if self._progress_writer is None:
            return REPORTED
        if self._progress is None:
            self._progress = RunProgress(self._run)
        self._progress_writer.report(self._progress, value)
        return REPORTED

    async def _end_progress(self) -> None:
        """The run ended (the runner calls this): write its last progress, if it reported."""
        if self._progress is not None and self._progress_writer is not None:
            await self._progress_writer.finish(self._progress)


async def _rollback(conn: Connection) -> None:
    if conn.closed:
        return
    try:
        await conn.execute("ROLLBACK")
    except Exception:
        conn.give_up()


class AsyncioJobContext(JobContext):
    """The context given to ``runtime="asyncio"`` handlers: the same API as asyncio coroutines."""

    def __init__(self, base: JobContext) -> None:
        super().__init__(base._run, base.db, base._outbox, base.worker_id, base._finish_params)
        self.progress = base.progress  # type: ignore[method-assign]
        import trio_asyncio

        self._base = base
        self.db = _AsyncioDatabase(base.db)  # type: ignore[assignment]
        self.notify_user = trio_asyncio.trio_as_aio(base.notify_user)  # type: ignore[method-assign]
        self.broadcast = trio_asyncio.trio_as_aio(base.broadcast)  # type: ignore[method-assign]
        self.parents = trio_asyncio.trio_as_aio(base.parents)  # type: ignore[method-assign]


class _AsyncioDatabase:
    def __init__(self, db: JobDatabase) -> None:
        import trio_asyncio

        self.execute = trio_asyncio.trio_as_aio(db.execute)
        self.url = db.url
