"""Claim due jobs in batches sized to free capacity, and sleep until there may be more.

Each claim takes up to ``free`` due rows in due order with ``FOR UPDATE SKIP LOCKED`` (two
workers never get the same row) and leases them. When it gets fewer than it asked for, the
queue is drained for now, and the same thread hop asks when the next pending job is due (or a
foreign lease expires); the claimer then sleeps until a NOTIFY, that moment, or the poll
interval, whichever comes first. So a job due in 2 s starts on time, and a lost notification
delays a job by at most the poll interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import trio
from psycopg.rows import tuple_row

from ..db import statements
from ..db.connection import Connection, connect, is_transient
from ..model import Job
from .wakeup import Wakeup

__all__ = ["Claimer", "ClaimerStatistics"]

logger = logging.getLogger(__name__)

RETRY_MIN_SECONDS = 0.1
RETRY_MAX_SECONDS = 5.0


@dataclass(frozen=True)
class ClaimerStatistics:
    claims: int
    claimed: int
    lost_reclaimed: int
    next_due_in: float | None


@dataclass(frozen=True)
class Claimed:
    job: Job
    lost: bool  # the previous run of this row was lost with its worker


class Claimer:
    """Owns the claim connection. ``free()`` says how many jobs may be taken now;
    ``spawn(claimed)`` starts one; ``wake`` is set by NOTIFY, freed slots and shutdown."""

    def __init__(
        self,
        url: str,
        owner: str,
        lease_seconds: float,
        poll_interval: float,
        wake: Wakeup,
        free: Callable[[], int],
        spawn: Callable[[Claimed], None],
        stopping: trio.Event,
    ) -> None:
        self._url = url
        self._owner = owner
        self._lease = lease_seconds
        self._poll = poll_interval
        self._wake = wake
        self._free = free
        self._spawn = spawn
        self._stopping = stopping
        self._conn: Connection | None = None
        self.clock_offset = 0.0  # database clock minus local clock, seconds
        #: The last claim was full: more jobs may be due, so a freed slot should claim again.
        self.backlog = False
        #: Woken (NOTIFY or timer) while there was no room: claim as soon as a slot frees.
        self.wanted = False
        self._claims = self._claimed = self._lost = 0
        self._next_due_in: float | None = None

    def statistics(self) -> ClaimerStatistics:
        return ClaimerStatistics(self._claims, self._claimed, self._lost, self._next_due_in)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim until ``stopping`` is set. Database errors are logged and retried."""
        self._conn = await connect(self._url, application_name="qdworker-claim")
        await self._next_wakeup()  # the database clock's offset, before any cron arithmetic
        task_status.started()
        delay = RETRY_MIN_SECONDS
        try:
            while not self._stopping.is_set():
                free = self._free()
                if free <= 0:
                    # Bounded, so a due job or expired lease is looked for at least every poll.
                    await self._wake.wait_until(trio.current_time() + self._poll)
                    self.wanted = True
                    continue
                try:
                    claimed = await self._claim(free)
                    for job in claimed:
                        self._spawn(job)
                    # Drained for now: find out how long to sleep (after the claimed jobs
                    # started, so they do not wait for this round trip).
                    wait = None if self.backlog else await self._next_wakeup()
                    delay = RETRY_MIN_SECONDS
                except Exception as exc:
                    if not is_transient(exc):
                        logger.exception("claiming failed")
                    else:
                        logger.warning("claiming failed (%s); retrying", exc)
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_SECONDS)
                    if self._conn.closed:
                        self._conn = await connect(self._url, application_name="qdworker-claim")
                    continue
                if wait is not None:
                    await self._wake.wait_until(trio.current_time() + wait)
        finally:
            with trio.CancelScope(shield=True):
                await self._conn.aclose()

    async def _claim(self, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` jobs; sets :attr:`backlog` if it got all it asked for."""
        assert self._conn is not None
        params = {"limit": limit, "owner": self._owner, "lease_seconds": self._lease}

        def claim(conn: psycopg.Connection[dict[str, Any]]) -> list[Claimed]:
            # Rows become Jobs here, in the claim's thread, straight from binary tuples.
            with conn.cursor(row_factory=tuple_row, binary=True) as cur:
                cur.execute(statements.get("claim"), params)
                return [Claimed(Job(*row[:-1]), row[-1]) for row in cur]

        self.wanted = False
        claimed = await self._conn.run(claim)
        self.backlog = len(claimed) >= limit
        self._claims += 1
        self._claimed += len(claimed)
        self._lost += sum(c.lost for c in claimed)
        return claimed

    async def _next_wakeup(self) -> float:
        """Seconds to sleep before looking again: until the next due job or foreign lease
        expiry, at most the poll interval. Also measures the database clock's offset."""
        assert self._conn is not None
        before = time.time()
        [row] = await self._conn.execute(statements.get("next_wakeup"), {"owner": self._owner})
        self.clock_offset = float(row["db_epoch"]) - (before + time.time()) / 2
        seconds = row["seconds"]
        self._next_due_in = None if seconds is None else max(0.0, float(seconds))
        return self._poll if self._next_due_in is None else min(self._poll, self._next_due_in)
