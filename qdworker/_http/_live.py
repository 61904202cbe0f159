"""The dashboard's live signal: "something changed, fetch your view again".

One :class:`LiveFeed` per HTTP server counts changes (a version number) from two sources,
only while at least one dashboard is connected:

* ``LISTEN qdworker_jobs`` and ``qdworker_queues`` through the one LISTEN helper
  (:class:`~qdworker._db.listen.Listener`): inserts of jobs by anyone, queue changes, "run
  now"; after a reconnect it counts a change too (notifications were lost meanwhile);
* this supervisor's events hub (job started, finished...), through one hub client of the
  admin role; the hub bounds its queue and, if it overflows, the feed counts a change and
  subscribes again. Like any websocket client, it makes this supervisor's workers send their
  job events (and other supervisors relay theirs) while a dashboard is open, and only then.

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
from typing import Final, Protocol

import trio

from .._db.connect import DbOptions
from .._db.listen import Listener, Listening, Notification
from .._events._handshake import DEV_IDENTITY
from .._events.hub import Hub
from .._logs import module_logger

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
#: Hub messages read at once (they only bump the version).
_HUB_BATCH: Final = 256


class HubSource(Protocol):
    @property
    def hub(self) -> Hub: ...


class LiveFeed:
    """See the module docstring. :meth:`run` in a nursery until cancelled."""

    def __init__(self, url: str, options: DbOptions, source: object | None = None) -> None:
        self._url = url
        self._options = options
        self._hub: Hub | None = getattr(source, "hub", None)
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
                if self._hub is not None:
                    nursery.start_soon(self._follow_hub, self._hub)
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

    async def _follow_hub(self, hub: Hub) -> None:
        while True:
            client = hub.add_client(DEV_IDENTITY)
            try:
                while await client.receive_batch(_HUB_BATCH):  # [] once overflowed or removed
                    self.bump()
            finally:
                hub.remove_client(client)
            self.bump()
            await trio.sleep(DEBOUNCE_SECONDS)

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
