"""The dashboard's live signal: "something changed, fetch your view again".

One :class:`LiveFeed` per HTTP server counts changes (a version number) from two sources,
only while at least one dashboard is connected:

* ``LISTEN qdworker_jobs`` and ``qdworker_queues`` through the one LISTEN helper
  (:class:`~qdworker._db.listen.Listener`): inserts of jobs by anyone, queue changes, "run
  now", at once; after a reconnect it counts a change too (notifications were lost meanwhile);
* Postgres's own count of the rows written to ``worker_jobs`` (``pg_stat_user_tables``), read
  every :data:`WATCH_SECONDS` by one cheap statement: runs starting and ending on any
  supervisor. The server publishes these counts about once a second, so a state change shows
  within one to two seconds. This costs the workers nothing: a dashboard is not a websocket
  client and does not make them send job events (that made a drain 26 % slower).

Each connected dashboard reads the feed through :meth:`LiveFeed.stream`, an event stream
(``text/event-stream``) that says ``change`` at most once per :data:`DEBOUNCE_SECONDS`
whatever the rate of changes (they fold into the version: nothing is queued per client), a
``ping`` comment every :data:`PING_SECONDS` (so dead connections are noticed), and ends after
:data:`STREAM_SECONDS` (the page reconnects). At most :data:`MAX_CLIENTS` streams at once;
:meth:`LiveFeed.admit` refuses more. A stream ends when its client goes (Starlette cancels it);
when the server stops, open streams are cut after hypercorn's grace period
(:data:`~.server.GRACEFUL_SECONDS`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import trio

from .._db.connect import DbOptions
from .._db.connection import Link
from .._db.listen import Listener, Listening, Notification
from .._logs import module_logger
from ..errors import DatabaseError

logger = module_logger(__name__)

#: A dashboard hears of changes at most this often.
DEBOUNCE_SECONDS: Final = 0.25
#: A quiet stream sends a comment this often.
PING_SECONDS: Final = 15.0
#: A stream ends after this long; the page opens a new one.
STREAM_SECONDS: Final = 600.0
#: Most live streams one server holds at once.
MAX_CLIENTS: Final = 64
#: The channels whose notifications mean "jobs or queues changed".
CHANNELS: Final = ("qdworker_jobs", "qdworker_queues")
#: How often the count of rows written to worker_jobs is read while a dashboard is open.
WATCH_SECONDS: Final = 1.0
#: Rows inserted, updated and deleted in worker_jobs since the server's statistics began.
WRITES_SQL: Final = """
SELECT n_tup_ins + n_tup_upd + n_tup_del AS writes
  FROM pg_stat_user_tables WHERE relid = 'worker_jobs'::regclass
"""


class LiveFeed:
    """See the module docstring. :meth:`run` in a nursery until cancelled."""

    def __init__(self, url: str, options: DbOptions) -> None:
        self._url = url
        self._options = options
        self.version = 0
        self.clients = 0
        self._changed = trio.Event()
        self._wanted = trio.Event()
        self._idle = trio.Event()

    def bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    def admit(self) -> bool:
        """Whether one more stream fits (see :data:`MAX_CLIENTS`)."""
        return self.clients < MAX_CLIENTS

    async def run(self) -> None:
        """Run the sources while anyone listens; until cancelled. Never raises otherwise."""
        while True:
            await self._wanted.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen)
                nursery.start_soon(self._watch_writes)
                await self._idle.wait()
                nursery.cancel_scope.cancel()
            logger.debug("dashboard live feed idle")

    async def _listen(self) -> None:
        send, receive = trio.open_memory_channel[Notification | Listening](16)
        listener = Listener(self._url, CHANNELS, self._options, purpose="dashboard-listen")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener.run, send)
            async with receive:
                async for message in receive:
                    if isinstance(message, Notification) or message.reconnected:
                        self.bump()

    async def _watch_writes(self) -> None:
        """Bump when the count of rows written to worker_jobs moves; a failed read (an outage:
        the listener reports its end) is tried again next time."""
        async with Link(self._url, "dashboard-watch", self._options, persistent=False) as link:
            seen: int | None = None
            while True:
                try:
                    rows = await link.execute(WRITES_SQL, idempotent=True)
                except DatabaseError:
                    rows = []
                writes = rows[0]["writes"] if rows else None
                if writes is not None and seen is not None and writes != seen:
                    self.bump()
                seen = writes if writes is not None else seen
                await trio.sleep(WATCH_SECONDS)

    def _join(self) -> None:
        self.clients += 1
        self._idle = trio.Event()
        self._wanted.set()

    def _leave(self) -> None:
        self.clients -= 1
        if self.clients == 0:
            self._wanted = trio.Event()
            self._idle.set()

    async def stream(self) -> AsyncIterator[str]:
        """One client's event stream (see the module docstring)."""
        self._join()
        try:
            yield "retry: 1000\n\n"
            seen = self.version
            with trio.move_on_after(STREAM_SECONDS):
                while True:
                    changed = self._changed
                    if self.version == seen:
                        with trio.move_on_after(PING_SECONDS) as quiet:
                            await changed.wait()
                        if quiet.cancelled_caught:
                            yield ": ping\n\n"
                            continue
                    seen = self.version
                    yield f"event: change\ndata: {seen}\n\n"
                    await trio.sleep(DEBOUNCE_SECONDS)
        finally:
            self._leave()
