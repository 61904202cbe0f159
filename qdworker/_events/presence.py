"""Which other supervisors are alive and how many websocket clients each has.

Every supervisor keeps a row in ``qdworker_supervisors`` (upserted every
:data:`PRESENCE_SECONDS`, and at once when its client count goes from zero to non-zero or
back) and announces its client count on the events channel; a clean exit deletes the row. A
peer not seen for :data:`LIVE_SECONDS_FACTOR` presence periods is gone. The relay forwards job
events only while some peer has clients, notifications while some peer lives.

The same ticks delete old by-reference event bodies and stale supervisor rows, in bounded
batches. Database errors are logged (debug) and retried at the next tick, never raised: the
connection is a :class:`~qdworker._db.connection.Link`, and presence simply pauses while the
database is away.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg
import trio

from .._db import statements
from .._db.connect import DbOptions
from .._db.connection import Link
from .._logs import module_logger
from ..errors import DatabaseError

logger = module_logger(__name__)

PRESENCE_SECONDS: Final = 5.0
"""Presence upsert (and peer refresh) interval."""
LIVE_SECONDS_FACTOR: Final = 3
"""A peer not seen for this many presence intervals is considered gone."""
CLIENT_CHECK_SECONDS: Final = 0.05
"""How often the local hub's client count is checked for a 0 <-> non-zero change."""
RETENTION_SECONDS: Final = 300.0
"""Age after which by-reference bodies in ``worker_events`` are deleted."""
STALE_SUPERVISOR_SECONDS: Final = 3600.0
"""Age after which a crashed supervisor's presence row is deleted."""
CLEANUP_INTERVAL_SECONDS: Final = 60.0
CLEANUP_BATCH_ROWS: Final = 1000
LEAVE_TIMEOUT_SECONDS: Final = 2.0
"""Bound on deleting the presence row on a clean exit."""

Raw = psycopg.Connection[Any]


@dataclass(frozen=True, slots=True)
class Peer:
    ws_clients: int
    seen: float  # trio clock


class Presence:
    """This supervisor's presence and its view of the peers. ``client_count()`` reads the
    local hub's client count; ``changed`` is called (trio thread) when the number of peers
    with clients changes."""

    def __init__(
        self,
        url: str,
        options: DbOptions,
        supervisor_id: str,
        client_count: Callable[[], int],
        *,
        presence_seconds: float = PRESENCE_SECONDS,
    ) -> None:
        self._link = Link(url, "relay-presence", options)
        self._id = supervisor_id
        self._client_count = client_count
        self._presence_seconds = presence_seconds
        self._live_seconds = LIVE_SECONDS_FACTOR * presence_seconds
        self._peers: dict[str, Peer] = {}
        self._announced = 0
        self._due = trio.Event()
        self.live_peers = 0
        self.peers_with_clients = 0
        self.on_peers_changed: Callable[[], None] | None = None

    def tick_now(self) -> None:
        """Announce and refresh at once (e.g. after LISTEN came back: announcements of
        peers may have been missed)."""
        self._due.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick until cancelled; on cancellation delete this supervisor's row (bounded)."""
        next_cleanup = trio.current_time()
        async with self._link:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_clients)
                    first = True
                    while True:
                        now = trio.current_time()
                        cleanup = now >= next_cleanup
                        if await self._tick(cleanup) and cleanup:
                            next_cleanup = now + CLEANUP_INTERVAL_SECONDS
                        if first:
                            task_status.started()
                            first = False
                        with trio.move_on_after(self._presence_seconds):
                            await self._due.wait()
                        self._due = trio.Event()
            finally:
                await self._leave()

    async def _watch_clients(self) -> None:
        while True:
            await trio.sleep(CLIENT_CHECK_SECONDS)
            if (self._client_count() > 0) != (self._announced > 0):
                self._due.set()

    async def _tick(self, cleanup: bool) -> bool:
        count = self._client_count()
        try:
            conn = await self._link.connection(wait=False)
            rows = await conn.run(lambda raw: self._presence_sync(raw, count, cleanup))
        except DatabaseError as exc:
            logger.debug("events relay: presence failed (%s); retrying", exc)
            return False
        self._announced = count
        now = trio.current_time()
        self._peers = {
            row["id"]: Peer(int(row["ws_clients"]), now - max(0.0, float(row["age_seconds"])))
            for row in rows
        }
        self.recount()
        return True

    def _presence_sync(self, raw: Raw, ws_clients: int, cleanup: bool) -> list[dict[str, Any]]:
        raw.execute(
            statements.get("events_presence"),
            {"id": self._id, "host": socket.gethostname(), "pid": os.getpid(),
             "ws_clients": ws_clients},
        )  # fmt: skip
        rows = raw.execute(
            statements.get("events_peers"), {"id": self._id, "live_seconds": self._live_seconds}
        ).fetchall()
        if cleanup:
            done = raw.execute(
                statements.get("events_cleanup"),
                {"limit": CLEANUP_BATCH_ROWS, "retention_seconds": RETENTION_SECONDS,
                 "stale_seconds": STALE_SUPERVISOR_SECONDS},
            ).fetchone()  # fmt: skip
            if done and (done["events"] or done["supervisors"]):
                logger.debug(
                    "events relay: deleted %d old event bodies, %d stale supervisors",
                    done["events"],
                    done["supervisors"],
                )
        return rows

    def on_presence(self, origin: str, value: int | None) -> None:
        """A peer announced its client count (``None``: it left)."""
        if value is None:
            self._peers.pop(origin, None)
        else:
            self._peers[origin] = Peer(value, trio.current_time())
        self.recount()

    def recount(self) -> None:
        horizon = trio.current_time() - self._live_seconds
        self._peers = {k: p for k, p in self._peers.items() if p.seen >= horizon}
        self.live_peers = len(self._peers)
        before = self.peers_with_clients
        self.peers_with_clients = sum(1 for p in self._peers.values() if p.ws_clients > 0)
        if self.on_peers_changed is not None and before != self.peers_with_clients:
            self.on_peers_changed()

    async def _leave(self) -> None:
        """Delete this supervisor's presence row (shielded, bounded; failures are logged)."""
        with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT_SECONDS) as scope:
            try:
                conn = await self._link.connection(wait=False)
                await conn.execute(statements.get("events_leave"), {"id": self._id})
            except DatabaseError as exc:
                logger.warning("events relay: could not delete the presence row (%s)", exc)
        if scope.cancelled_caught:
            logger.warning("events relay: deleting the presence row timed out")
