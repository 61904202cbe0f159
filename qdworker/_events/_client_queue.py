"""One websocket client's bounded queue of outbound texts (:class:`HubClient`).

The hub offers pre-serialised JSON texts without ever blocking; the client's connection
handler takes them in batches (:meth:`HubClient.receive_batch`). A queue bounded by
:data:`DEFAULT_CLIENT_QUEUE_MESSAGES` messages and :data:`DEFAULT_CLIENT_QUEUE_CHARS`
characters (or the hub's settings) is what each client owns; when an offer would exceed either
bound the client is marked *overflowed*: its queue is freed, a warning is logged (under
``qdworker._events.hub``, the public module's name), :meth:`HubClient.wait_overflowed` returns
and :meth:`HubClient.receive_batch` returns ``[]`` from then on. Nothing here raises.

Not thread-safe: used from the trio thread of the websocket server only.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Final

import trio

from ._hub_statistics import HubCounters
from ._subscription import Subscription, SubscriptionFilter
from .tokens import Identity

logger = logging.getLogger("qdworker.events.hub")

DEFAULT_CLIENT_QUEUE_MESSAGES: Final = 8192
"""Messages a client may lag behind before it is dropped."""
DEFAULT_CLIENT_QUEUE_CHARS: Final = 1024 * 1024
"""Characters of queued messages per client; a client that falls further behind is dropped."""
DEFAULT_RECEIVE_BATCH_MESSAGES: Final = 64
"""Texts :meth:`HubClient.receive_batch` returns at most, unless told otherwise."""


class HubClient:
    """One connected consumer, created by :meth:`Hub.add_client`.

    The owner (a websocket handler) loops on :meth:`receive_batch` and must
    call :meth:`Hub.remove_client` when done (also after an overflow).
    """

    __slots__ = (
        "_closed",
        "_counters",
        "_filter",
        "_max_chars",
        "_maxsize",
        "_overflow_event",
        "_queue",
        "_queued_chars",
        "_waiter",
        "client_id",
        "identity",
    )

    def __init__(
        self,
        counters: HubCounters,
        client_id: int,
        identity: Identity | None,
        maxsize: int,
        max_chars: int,
    ) -> None:
        self._counters = counters
        self.client_id = client_id
        self.identity = identity
        self._maxsize = maxsize
        self._max_chars = max_chars
        self._queue: deque[str] = deque()
        self._queued_chars = 0
        self._waiter: trio.Event | None = None
        self._overflow_event = trio.Event()
        self._closed = False
        self._filter = SubscriptionFilter()

    @property
    def subscription(self) -> Subscription:
        return self._filter.subscription

    @property
    def overflowed(self) -> bool:
        return self._overflow_event.is_set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def wait_overflowed(self) -> None:
        """Return once this client's queue has overflowed."""
        await self._overflow_event.wait()

    async def receive_batch(self, max_items: int = DEFAULT_RECEIVE_BATCH_MESSAGES) -> list[str]:
        """Wait for queued texts and return up to ``max_items`` of them, oldest
        first.  Returns ``[]`` once the client has overflowed or was removed."""
        while True:
            if self._closed or self._overflow_event.is_set():
                return []
            if self._queue:
                q = self._queue
                count = min(max_items, len(q))
                batch = [q.popleft() for _ in range(count)]
                self._queued_chars -= sum(map(len, batch))
                return batch
            waiter = self._waiter = trio.Event()
            await waiter.wait()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    def _close(self) -> None:
        """Mark removed (by :meth:`Hub.remove_client`): free the queue, wake the receiver."""
        self._closed = True
        self._queue.clear()
        self._wake()

    def _offer(self, text: str) -> bool:
        """Enqueue without blocking; on a full queue mark overflowed."""
        if self._closed or self._overflow_event.is_set():
            return False
        if len(self._queue) >= self._maxsize or self._queued_chars + len(text) > self._max_chars:
            self._queue.clear()
            self._queued_chars = 0
            self._overflow_event.set()
            self._counters.dropped_clients += 1
            logger.warning(
                "client %d fell behind by more than %d messages or %d characters: dropped",
                self.client_id, self._maxsize, self._max_chars,
            )  # fmt: skip
            self._wake()
            return False
        self._queue.append(text)
        self._queued_chars += len(text)
        self._counters.delivered += 1
        self._wake()
        return True
