"""Claim due jobs in batches sized to the worker's room, and sleep until there may be more.

Each round first claims from the limited queues the worker serves (cluster-wide concurrency,
per-key concurrency, rate limits, fair share: ``claim_limited``, up to the worker's free
slots, never into its ready queue, since a claimed job holds a slot of the queue), when there
are any, then up to :meth:`~.flow.Flow.room` due rows of the job types this worker runs from
the other queues it serves, in run order (priority, aged by waiting), with ``FOR UPDATE SKIP
LOCKED`` (two workers never get the same row), and leases them. Whether limited queues exist
is read again when ``qdworker_queues`` is notified (a settings change), after a reconnect
and every poll interval. When a round gets fewer jobs than it asked for, the queues are
drained for now, and the claimer asks when the next pending job is due (or a foreign lease
expires, or a rate limit lets a job start); it then sleeps until a NOTIFY (a job inserted,
released, or finished in a limited queue), that moment, or the poll interval, whichever comes
first.

Faults. The claim connection is a :class:`~qdworker._db.connection.Link`: while the database is
away the claimer waits for it (the outage is logged once), and after every reconnect it asks
the server when it started serving (:func:`~qdworker._db.store.server_epoch`): for one lease
after a restart it rescues no expired lease, so the workers that lived through the outage
renew their runs instead of seeing them run twice; for one lease after a failover it claims
nothing at all, since the new primary may lack the last claims (asynchronous replication) and
the workers running those jobs need that long to notice and stop them. A claim cut off by a
broken connection may have committed: the claimer then gives back every row leased to it that
it does not hold (``release_orphans``) before claiming again, so those jobs never wait for a
lease to expire and never count as lost runs. The claim statement itself is never cancelled
half-way: at shutdown the claimer stops between claims.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import trio

from .._db import store
from .._db.connect import GENERIC_PLANS, DbOptions
from .._db.connection import Connection, Link
from .._logs import module_logger
from ..errors import DatabaseError, DatabaseUnavailableError, OutcomeUnknownError
from .flow import Flow
from .run import Run

logger = module_logger(__name__)

#: Pause after a claim the database refused for another reason than a lost connection.
ERROR_PAUSE_SECONDS: Final = 1.0
#: While a backlog drains, each queue's claims start after the last job claimed from it (the
#: cursors of ``claim``); at least this often, and whenever that finds less than a full batch,
#: a full claim looks again from the start (jobs released or due earlier, or of a higher
#: priority) and rescues lost runs.
FULL_CLAIM_SECONDS: Final = 1.0
#: Runs lost with their worker (lease expired) are looked for at most this often while claims
#: follow one another, and at once after a timed wake-up (a lease may have expired) or a
#: release NOTIFY (a supervisor ended a dead worker's leases). Looking reads the running rows.
RESCUE_SECONDS: Final = 1.0
#: A claim or renewal lets the worker act on a job for this part of a lease (measured from
#: when the statement was sent): the rest is margin for clock rates and delays, so the worker
#: stops before any other worker may rescue the job.
VALID_FRACTION: Final = 0.9


class Claimer:
    """Owns the claim connection; feeds :class:`~.flow.Flow`. ``stopping`` ends it between
    claims; ``flow.wake`` wakes it."""

    def __init__(
        self,
        url: str,
        options: DbOptions,
        flow: Flow,
        *,
        owner: str,
        types: Sequence[str],
        lease_seconds: float,
        poll_seconds: float,
        stopping: trio.Event,
        queues: Sequence[str] | None = None,
    ) -> None:
        self._flow = flow
        self._owner = owner
        self._types = tuple(types)
        self._queues = None if queues is None else tuple(queues)
        self._lease = lease_seconds
        self._poll = poll_seconds
        self._stopping = stopping
        self._link = Link(
            url, "claim", options, on_connect=self._connected, server_settings=GENERIC_PLANS
        )
        self._rescue_after = 0.0  # monotonic time from which expired leases may be rescued
        self._next_rescue = 0.0  # monotonic time from which to look for lost runs again
        self._pause_until = 0.0  # monotonic time from which claiming may resume (failover)
        self._cursors: dict[str, tuple[datetime, int]] = {}  # see store.Cursors
        self._next_full_claim = 0.0
        self._limited: bool | None = None  # serves a limited queue? (None: ask the database)
        self._limited_until = 0.0  # monotonic time to ask again
        self._orphans = False  # a claim's outcome is unknown: rows may be leased to us
        self.clock_offset = 0.0  # database clock - local clock, seconds
        self.backlog = False  # the last claim got all it asked for: probably more to come
        self.claimed = 0

    def release_heard(self) -> None:
        """Leases were ended or runs given back: look for lost runs in the next claim."""
        self._next_rescue = 0.0

    def queues_changed(self) -> None:
        """Queue settings changed (or may have): read them again before the next claim."""
        self._limited = None

    async def _connected(self, conn: Connection) -> None:
        self._limited = None
        sent = time.monotonic()
        serving, failover = await conn.run(store.server_epoch)
        if serving is None or serving >= self._lease:
            return
        grace = self._lease - serving
        self._rescue_after = sent + grace
        if failover:
            self._pause_until = sent + grace
        logger.info(
            "the database %s %.1f s ago: %s for %.1f s more (workers that lived through it "
            "may still renew their runs)",
            "failed over" if failover else "restarted",
            serving,
            "claiming nothing" if failover else "rescuing no expired lease",
            grace,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim until ``stopping`` is set (then return between two claims) or cancelled."""
        task_status.started()
        async with self._link:
            while not self._stopping.is_set():
                paused = self._pause_until - time.monotonic()
                if paused > 0:
                    with trio.move_on_after(paused):
                        await self._stopping.wait()
                    continue
                room = self._flow.room()
                if room <= 0:
                    # Bounded, so a due job or an expired lease is looked for every poll.
                    self._flow.want_room = True
                    await self._flow.wake.wait_until(trio.current_time() + self._poll)
                    continue
                wait = await self._round(room)
                if wait is not None:
                    woken = await self._flow.wake.wait_until(trio.current_time() + wait)
                    if not woken:  # timed: a lease expiry may be what was waited for
                        self._next_rescue = 0.0

    async def _round(self, room: int) -> float | None:
        """One claim (and, when drained, the next wake-up); returns how long to sleep, or
        None to claim again at once."""
        conn = await self._link.connection()  # cancellable: no statement is running
        if time.monotonic() < self._pause_until:  # this connection found a failover
            return 0.0
        wait: float | None = None
        try:
            with trio.CancelScope(shield=True):  # bounded by the connection's deadline
                if self._orphans:
                    await self._release_orphans(conn)
                claimed = await self._claim(conn, room)
                for run in claimed:
                    self._flow.add(run)
                if not (self.backlog or self._stopping.is_set()):
                    wait = await self._next_wakeup(conn)
        except (DatabaseUnavailableError, OutcomeUnknownError) as exc:
            self._link.discard(conn, exc)
            self._orphans = self._orphans or isinstance(exc, OutcomeUnknownError)
            return None
        except DatabaseError as exc:
            logger.error("claiming failed: %s", exc)  # noqa: TRY400 (one line, the cause)
            return ERROR_PAUSE_SECONDS
        return wait

    async def _release_orphans(self, conn: Connection) -> None:
        held = list(self._flow.held)
        released = await conn.run(
            lambda raw: store.release_orphans(raw, owner=self._owner, held=held)
        )
        self._orphans = False
        if released:
            logger.info(
                "gave back %d job(s) claimed by a statement whose answer was lost", released
            )

    async def _claim(self, conn: Connection, room: int) -> list[Run]:
        sent = time.monotonic()
        self._flow.want_room = False
        rescue = sent >= self._rescue_after and sent >= self._next_rescue
        claimed: list[store.Claimed] = []
        limited_full = False
        if await self._serves_limited(conn, sent):
            free = self._flow.free_slots()
            if free > 0:
                claimed = await conn.run(
                    lambda raw: store.claim_limited(
                        raw, limit=free, owner=self._owner, lease_seconds=self._lease,
                        types=self._types, queues=self._queues, rescue=rescue,
                    )
                )  # fmt: skip
                limited_full = len(claimed) >= free
                room -= len(claimed)
        if room > 0:
            claimed += await self._claim_unlimited(conn, room, sent, rescue)
        if rescue:
            self._next_rescue = sent + RESCUE_SECONDS
        else:
            self.backlog = True
        self._flow.want_room = self.backlog or limited_full
        self.claimed += len(claimed)
        valid_until = sent + self._lease * VALID_FRACTION
        return [Run(c.job, c.lost, valid_until) for c in claimed]

    async def _serves_limited(self, conn: Connection, now: float) -> bool:
        if self._limited is None or now >= self._limited_until:
            self._limited = await conn.run(
                lambda raw: store.limited_queues(raw, queues=self._queues)
            )
            self._limited_until = now + self._poll
        return self._limited

    async def _claim_unlimited(
        self, conn: Connection, limit: int, sent: float, rescue: bool
    ) -> list[store.Claimed]:
        fast = self.backlog and bool(self._cursors) and sent < self._next_full_claim
        cursors = self._cursors if fast else None
        claimed = await conn.run(
            lambda raw: store.claim(
                raw, limit=limit, owner=self._owner, lease_seconds=self._lease,
                types=self._types, queues=self._queues, rescue=rescue and not fast,
                cursors=cursors,
            )
        )  # fmt: skip
        if not fast:
            self._next_full_claim = sent + FULL_CLAIM_SECONDS
        self._cursors = {}
        for c in claimed:
            if c.run_order is not None:
                place = (c.run_order, c.job.id)
                self._cursors[c.job.queue] = max(self._cursors.get(c.job.queue, place), place)
        # A short fast-path claim does not mean the queues are drained (jobs may wait before
        # a cursor): look again at once, with a full claim.
        self.backlog = len(claimed) >= limit or fast
        if fast and len(claimed) < limit:
            self._next_full_claim = 0.0
        return claimed

    async def _next_wakeup(self, conn: Connection) -> float:
        """Seconds to sleep: until the next due job or foreign lease expiry (not before
        rescuing is allowed again), at most the poll interval. Also measures the database
        clock's offset."""
        before = time.time()
        seconds, db_epoch = await conn.run(
            lambda raw: store.next_wakeup(
                raw, owner=self._owner, types=self._types, queues=self._queues
            )
        )
        self.clock_offset = db_epoch - (before + time.time()) / 2
        wait = self._poll if seconds is None else min(self._poll, max(0.0, seconds))
        rescue_in = self._rescue_after - time.monotonic()
        return min(wait, rescue_in) if rescue_in > 0 else wait
