"""Run due jobs in the test's own process: :class:`InlineWorker` and :func:`run_jobs`.

For unit-testing handlers and the code that enqueues them without starting a supervisor::

    async with InlineWorker(db_url) as worker:          # trio
        await queue.submit_job(type="sendEmail", data={"to": "a@b.c"})
        [run] = await worker.run_due()
        assert run.succeeded and run.result == {"sent": True}
        assert worker.messages == [...]                  # what ctx.notify_user / broadcast sent

    runs = run_jobs(db_url)                               # the same, from a plain sync test

It claims and completes with the worker's own statements (fencing, successors, retries, cron
ticks: all as in production) and runs each handler with the worker's runner, one job at a
time; job types are those registered in this process (import your job modules first).
Messages to websocket clients are recorded in :attr:`InlineWorker.messages` instead of sent.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .. import _protocol as protocol
from .. import _registry as registry
from .._db import store
from .._db.connect import DbOptions
from .._db.connection import Link
from .._model import Job
from .._worker.completer import Completer
from .._worker.context import JobContext, JobDatabase
from .._worker.flow import Flow
from .._worker.outbox import Outbox
from .._worker.run import Run
from .._worker.runner import execute

#: Most jobs one :meth:`InlineWorker.run_due` claims.
DEFAULT_LIMIT = 1000


@dataclass(frozen=True)
class InlineRun:
    """One job run by :class:`InlineWorker`: the job as claimed and how it ended."""

    job: Job
    ending: str  # succeeded, failed, timed_out, cancelled, release, discard
    result: Any

    @property
    def succeeded(self) -> bool:
        return self.ending == "succeeded"


class _Recorder(Outbox):
    """An outbox that keeps what handlers send to users instead of sending it."""

    def __init__(self) -> None:
        super().__init__(None)
        self.messages: list[dict[str, Any]] = []

    async def send(self, msg: Mapping[str, Any]) -> None:
        if msg.get("kind") in (protocol.SEND_TO_USER, protocol.BROADCAST):
            self.messages.append(dict(msg))


class InlineWorker:
    """Runs due jobs in this process (trio). Owns its connections: use ``async with``."""

    def __init__(
        self,
        url: str,
        *,
        types: Sequence[str] | None = None,
        timezone: str = "UTC",
        lease_seconds: float = 60.0,
    ) -> None:
        from .._jobs import builtin  # noqa: F401  (the built-in types, as in a worker)

        self._url = url
        self._options = DbOptions()
        self._types = list(types) if types is not None else sorted(registry.registered())
        self._lease = lease_seconds
        self._owner = f"inline:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._flow = Flow(concurrency=1)
        self._recorder = _Recorder()
        self._db = JobDatabase(url, 4, self._options)
        self._link = Link(url, "inline", self._options)
        self._completer = Completer(
            url, self._options, self._flow, self._recorder, timezone=timezone,
            clock_offset=lambda: 0.0,
        )  # fmt: skip

    @property
    def messages(self) -> list[dict[str, Any]]:
        """``send-to-user`` and ``broadcast`` messages the handlers sent, in order."""
        return self._recorder.messages

    async def run_due(self, *, limit: int = DEFAULT_LIMIT) -> list[InlineRun]:
        """Claim the due jobs (at most ``limit``), run them one by one, write their
        outcomes; return them in claim order (due order)."""
        claimed = await self._link.run(
            lambda raw: store.claim_limited(
                raw, limit=limit, owner=self._owner, lease_seconds=self._lease,
                types=self._types, queues=None, rescue=True,
            )
        )  # fmt: skip
        claimed += await self._link.run(
            lambda raw: store.claim(
                raw, limit=limit - len(claimed), owner=self._owner, lease_seconds=self._lease,
                types=self._types, queues=None, rescue=True,
            )
        )  # fmt: skip
        runs: list[InlineRun] = []
        for item in claimed:
            self._flow.add(Run(item.job, item.lost, time.monotonic() + self._lease))
            run = await self._flow.next_run()
            ctx = JobContext(
                run, self._db, self._recorder, self._owner, self._completer.transaction_params
            )
            outcome = await execute(run, ctx)
            self._flow.done(run, outcome)
            await self._completer.write(await self._flow.take(1))
            runs.append(InlineRun(run.job, outcome.ending, outcome.result))
        return runs

    async def run_until_idle(self, *, rounds: int = 100) -> list[InlineRun]:
        """:meth:`run_due` until no job is due (jobs that handlers enqueue for now run too;
        retries wait at least a second, so they do not). Stops after ``rounds`` rounds."""
        done: list[InlineRun] = []
        for _ in range(rounds):
            runs = await self.run_due()
            if not runs:
                break
            done.extend(runs)
        return done

    async def aclose(self) -> None:
        await self._link.aclose()
        await self._completer.aclose()
        await self._db.aclose()

    async def __aenter__(self) -> InlineWorker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def run_jobs(url: str, *, types: Sequence[str] | None = None) -> list[InlineRun]:
    """Run every due job now, from synchronous code (see :meth:`InlineWorker.run_until_idle`).
    Not from inside a running event loop: there, use :class:`InlineWorker`."""

    async def main() -> list[InlineRun]:
        async with InlineWorker(url, types=types) as worker:
            return await worker.run_until_idle()

    return trio.run(main)
