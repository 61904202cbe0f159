"""The one LISTEN helper: a connection that stays subscribed, whatever happens to it.

:class:`Listener` keeps one autocommit connection with ``LISTEN`` on its channels and sends
what arrives into a trio memory channel:

* :class:`Notification` for each notification, in order;
* :class:`Listening` each time ``LISTEN`` is (again) in place: first at start, then after every
  reconnect. A NOTIFY sent while the connection was down is lost for good, so the consumer
  must catch up on its own when it receives ``Listening(reconnected=True)`` (the worker claims
  once; the relay reconciles its peers).

How it waits: ``trio.lowlevel.wait_readable`` on the socket, after draining
``notifies(timeout=0)`` (notifications that arrived while another statement ran on this
connection sit in psycopg's buffer and never make the socket readable). While idle it sends a
``SELECT 1`` every :attr:`~.connect.DbOptions.timeout_seconds` / 2, bounded by the client
deadline, so a connection whose path black-holes packets is noticed within about
``QDWORKER_DB_TIMEOUT`` even though TCP keepalives to a proxy keep succeeding.

Errors never leave :meth:`Listener.run`: a broken connection is reopened through
:class:`~.connection.Link` (backoff, one outage line); only cancellation ends it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
import trio

from .._logs import module_logger
from ..errors import DatabaseError
from .connect import DbOptions
from .connection import Connection, Link

logger = module_logger(__name__)


@dataclass(frozen=True, slots=True)
class Notification:
    channel: str
    payload: str


@dataclass(frozen=True, slots=True)
class Listening:
    """``LISTEN`` is in place; ``reconnected``: after a reconnect (notifications were lost)."""

    reconnected: bool


class Listener:
    """Owns one LISTEN connection (through a :class:`Link`); see the module docstring."""

    def __init__(
        self, url: str, channels: Sequence[str], options: DbOptions, *, purpose: str = "listen"
    ) -> None:
        for channel in channels:
            if not channel.isidentifier():
                raise ValueError(f"not a channel name: {channel!r}")
        self._channels = tuple(channels)
        self._options = options
        self._link = Link(url, purpose, options, on_connect=self._listen)
        self.notifications = 0

    @property
    def connected(self) -> bool:
        return self._link.connected

    async def _listen(self, conn: Connection) -> None:
        statement = "; ".join(f"LISTEN {channel}" for channel in self._channels)
        await conn.run(lambda raw: raw.execute(statement))

    async def run(
        self,
        send: trio.MemorySendChannel[Notification | Listening],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled. ``started`` once the first ``LISTEN`` is in place, or after
        the first failed attempt (the caller then relies on its poll until it is back)."""
        try:
            conn = await self._link.connection(wait=False)
        except DatabaseError as exc:
            logger.debug("LISTEN connection not possible yet: %s", exc)
            task_status.started()
            conn = await self._link.connection()
        else:
            task_status.started()
        try:
            while True:
                await send.send(Listening(reconnected=self._link.connects > 1))
                try:
                    await self._receive(conn, send)
                except (DatabaseError, psycopg.Error, OSError) as exc:
                    logger.debug("LISTEN connection lost: %s", exc)
                    conn.give_up()
                conn = await self._link.connection()
        finally:
            await self._link.aclose()

    async def _receive(
        self, conn: Connection, send: trio.MemorySendChannel[Notification | Listening]
    ) -> None:
        fd = conn.raw.fileno()
        ping_every = self._options.timeout_seconds / 2
        while True:
            for note in conn.raw.notifies(timeout=0):
                self.notifications += 1
                await send.send(Notification(note.channel, note.payload))
            with trio.move_on_after(ping_every) as idle:
                await trio.lowlevel.wait_readable(fd)
            if idle.cancelled_caught:
                await conn.run(lambda raw: raw.execute("SELECT 1"))
