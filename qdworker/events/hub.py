"""In-process fan-out of worker traffic to websocket clients.

The hub sits between the supervisor's IPC readers (publishers) and the
websocket connection handlers (consumers).  Publishing is synchronous and
never blocks or awaits: every connected client owns a bounded queue of
pre-serialised JSON texts; when a client's queue is full the client is marked
*overflowed*, its queue is freed, and its handler disconnects it (close code
:data:`qdworker.events.websocket.CLOSE_CLIENT_TOO_SLOW`).  Nobody else is
slowed down.  Each outbound message is serialised once per publish, only if
at least one client will receive it; with no clients connected, publishing
costs a couple of attribute reads.

Routing and authorisation:

* ``send_to_user(user_id, message)``: the user's own clients and admin
  clients.  Not narrowed by subscriptions.
* ``broadcast(message)``: every client, including anonymous ones.  Not
  narrowed by subscriptions.
* ``publish_job_events(events)``: each event goes to the clients of the
  job's ``user_id`` and to admin clients, narrowed by each client's
  :class:`Subscription`.  Anonymous clients receive no job events.

Job event objects from workers use snake_case (see
:mod:`qdworker.supervisor.ipc`); clients receive
``{"type": "job", "data": {...}}`` with camelCase keys.  Malformed events or
messages are dropped, counted in :attr:`HubStatistics.invalid` and logged at
most once per :data:`INVALID_LOG_INTERVAL_SECONDS`.

The hub is not thread-safe: call it only from the trio thread that runs the
websocket server.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

from qdworker.events.tokens import Identity

__all__ = [
    "DEFAULT_CLIENT_QUEUE_CHARS",
    "DEFAULT_CLIENT_QUEUE_SIZE",
    "INVALID_LOG_INTERVAL_SECONDS",
    "JOB_EVENT_KINDS",
    "MAX_SUBSCRIPTION_ITEMS",
    "Hub",
    "HubClient",
    "HubStatistics",
    "Subscription",
    "job_event_to_client",
]

logger = logging.getLogger(__name__)

DEFAULT_CLIENT_QUEUE_SIZE: Final = 8192  # messages
#: Characters of queued messages per client; a client that falls further behind is dropped.
DEFAULT_CLIENT_QUEUE_CHARS: Final = 1024 * 1024
"""Messages a client may lag behind before it is dropped."""

MAX_SUBSCRIPTION_ITEMS: Final = 1000
"""Upper bound on the entries of each subscription list (incl. followed successors)."""

INVALID_LOG_INTERVAL_SECONDS: Final = 10.0
"""Minimum spacing of warnings about dropped malformed IPC payloads."""

JOB_EVENT_KINDS: Final = frozenset(
    {"started", "succeeded", "failed", "rescheduled", "cancelled", "timed_out"}
)

_JSON_SEPARATORS: Final = (",", ":")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=_JSON_SEPARATORS, allow_nan=False)


@dataclass(frozen=True, slots=True)
class Subscription:
    """Narrowing of job events for one client.

    ``None`` for a dimension means "any"; dimensions combine with AND,
    entries within one dimension with OR.  When ``job_ids`` is set and a
    followed job is rescheduled, its successor id is followed too (up to
    :data:`MAX_SUBSCRIPTION_ITEMS`).
    """

    job_types: frozenset[str] | None = None
    tags: frozenset[str] | None = None
    job_ids: frozenset[int] | None = None

    @property
    def is_everything(self) -> bool:
        return self.job_types is None and self.tags is None and self.job_ids is None


EVERYTHING: Final = Subscription()


@dataclass(frozen=True, slots=True)
class HubStatistics:
    """Point-in-time counters.  ``published`` counts accepted messages/events;
    ``delivered`` counts (message, client) enqueues; ``dropped_clients``
    counts queue overflows; ``invalid`` counts malformed payloads dropped."""

    clients: int
    admin_clients: int
    anonymous_clients: int
    users: int
    published: int
    delivered: int
    dropped_clients: int
    invalid: int


class HubClient:
    """One connected consumer, created by :meth:`Hub.add_client`.

    The owner (a websocket handler) loops on :meth:`receive_batch` and must
    call :meth:`Hub.remove_client` when done (also after an overflow).
    """

    __slots__ = (
        "_closed",
        "_follow_ids",
        "_hub",
        "_max_chars",
        "_maxsize",
        "_overflow_event",
        "_queue",
        "_queued_chars",
        "_subscription",
        "_waiter",
        "client_id",
        "identity",
    )

    def __init__(
        self, hub: Hub, client_id: int, identity: Identity | None, maxsize: int, max_chars: int
    ) -> None:
        self._hub = hub
        self.client_id = client_id
        self.identity = identity
        self._maxsize = maxsize
        self._max_chars = max_chars
        self._queue: deque[str] = deque()
        self._queued_chars = 0
        self._waiter: trio.Event | None = None
        self._overflow_event = trio.Event()
        self._closed = False
        self._subscription = EVERYTHING
        self._follow_ids: set[int] | None = None

    @property
    def subscription(self) -> Subscription:
        return self._subscription

    @property
    def overflowed(self) -> bool:
        return self._overflow_event.is_set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def wait_overflowed(self) -> None:
        """Return once this client's queue has overflowed."""
        await self._overflow_event.wait()

    async def receive_batch(self, max_items: int = 64) -> list[str]:
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

    def _offer(self, text: str) -> bool:
        """Enqueue without blocking; on a full queue mark overflowed."""
        if self._closed or self._overflow_event.is_set():
            return False
        if len(self._queue) >= self._maxsize or self._queued_chars + len(text) > self._max_chars:
            self._queue.clear()
            self._queued_chars = 0
            self._overflow_event.set()
            self._hub._dropped_clients += 1
            logger.warning(
                "client %d fell behind by more than %d messages or %d characters: dropped",
                self.client_id, self._maxsize, self._max_chars,
            )  # fmt: skip
            self._wake()
            return False
        self._queue.append(text)
        self._queued_chars += len(text)
        self._hub._delivered += 1
        self._wake()
        return True

    def _matches(self, job_type: Any, tag: Any, job_id: Any, successor_id: Any) -> bool:
        sub = self._subscription
        if sub.job_types is not None and job_type not in sub.job_types:
            return False
        if sub.tags is not None and tag not in sub.tags:
            return False
        follow = self._follow_ids
        if follow is not None:
            if job_id not in follow:
                return False
            if isinstance(successor_id, int) and len(follow) < MAX_SUBSCRIPTION_ITEMS:
                follow.add(successor_id)
        return True


def job_event_to_client(event: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a worker job event (snake_case) to the client message."""
    return {
        "type": "job",
        "data": {
            "event": event["event"],
            "id": event["id"],
            "tag": event.get("tag"),
            "jobType": event.get("type"),
            "userId": event["user_id"],
            "attempt": event.get("attempt"),
            "due": event.get("due"),
            "started": event.get("started"),
            "finished": event.get("finished"),
            "successorId": event.get("successor_id"),
        },
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Hub:
    """Fan-out point; see the module docstring for routing rules."""

    def __init__(
        self,
        *,
        client_queue_size: int = DEFAULT_CLIENT_QUEUE_SIZE,
        client_queue_chars: int = DEFAULT_CLIENT_QUEUE_CHARS,
    ) -> None:
        if client_queue_size < 1 or client_queue_chars < 1:
            raise ValueError("client_queue_size and client_queue_chars must be >= 1")
        self._client_queue_size = client_queue_size
        self._client_queue_chars = client_queue_chars
        self._clients: set[HubClient] = set()
        self._admins: set[HubClient] = set()
        self._by_user: dict[int, set[HubClient]] = {}  # non-admin identified clients
        self._user_counts: dict[int, int] = {}  # all identified clients, for caps
        self._next_client_id = 1
        self._published = 0
        self._delivered = 0
        self._dropped_clients = 0
        self._invalid = 0
        self._last_invalid_log = -INVALID_LOG_INTERVAL_SECONDS
        #: Called (in the trio thread) after a client is added or removed.
        self.on_clients_changed: Callable[[], None] | None = None

    # ------------------------------------------------------------------ clients

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def user_client_count(self, user_id: int) -> int:
        """Connected clients identified as ``user_id`` (admins included)."""
        return self._user_counts.get(user_id, 0)

    def add_client(self, identity: Identity | None = None) -> HubClient:
        """Register a consumer; ``None`` means anonymous (broadcasts only)."""
        client = HubClient(
            self, self._next_client_id, None, self._client_queue_size, self._client_queue_chars
        )
        self._next_client_id += 1
        self._clients.add(client)
        self._index(client, identity)
        if self.on_clients_changed is not None:
            self.on_clients_changed()
        return client

    def remove_client(self, client: HubClient) -> None:
        """Unregister a consumer (idempotent); wakes its pending receive."""
        if client._closed:
            return
        client._closed = True
        self._unindex(client)
        self._clients.discard(client)
        client._queue.clear()
        client._wake()
        if self.on_clients_changed is not None:
            self.on_clients_changed()

    def set_identity(self, client: HubClient, identity: Identity | None) -> None:
        """Change who ``client`` is (register / re-register)."""
        if client._closed:
            return
        self._unindex(client)
        self._index(client, identity)

    def set_subscription(self, client: HubClient, subscription: Subscription) -> None:
        """Replace the job-event narrowing of ``client``."""
        client._subscription = subscription
        client._follow_ids = None if subscription.job_ids is None else set(subscription.job_ids)

    def _index(self, client: HubClient, identity: Identity | None) -> None:
        client.identity = identity
        if identity is None:
            return
        self._user_counts[identity.user_id] = self._user_counts.get(identity.user_id, 0) + 1
        if identity.admin:
            self._admins.add(client)
        else:
            self._by_user.setdefault(identity.user_id, set()).add(client)

    def _unindex(self, client: HubClient) -> None:
        identity = client.identity
        if identity is None:
            return
        remaining = self._user_counts.get(identity.user_id, 0) - 1
        if remaining > 0:
            self._user_counts[identity.user_id] = remaining
        else:
            self._user_counts.pop(identity.user_id, None)
        if identity.admin:
            self._admins.discard(client)
        else:
            users = self._by_user.get(identity.user_id)
            if users is not None:
                users.discard(client)
                if not users:
                    del self._by_user[identity.user_id]
        client.identity = None

    # --------------------------------------------------------------- publishing

    def broadcast(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` (a JSON object) to every client."""
        self._published += 1
        if not self._clients:
            return
        text = self._serialise(message)
        if text is None:
            return
        for client in self._clients:
            client._offer(text)

    def send_to_user(self, user_id: int, message: Mapping[str, Any]) -> None:
        """Send ``message`` to ``user_id``'s clients and to admin clients."""
        self._published += 1
        users = self._by_user.get(user_id)
        if not users and not self._admins:
            return
        text = self._serialise(message)
        if text is None:
            return
        for group in (users or (), self._admins):
            for client in group:
                client._offer(text)

    def publish_job_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Route worker job events (see module docstring).  Never blocks."""
        by_user = self._by_user
        admins = self._admins
        if not by_user and not admins:
            if isinstance(events, list):
                self._published += len(events)
            else:
                self._published += sum(1 for _ in events)
            return
        for event in events:
            self._published += 1
            if not isinstance(event, Mapping):
                self._note_invalid("job event is not an object", event)
                continue
            user_id = event.get("user_id")
            users = by_user.get(user_id) if isinstance(user_id, int) else None
            if not users and not admins:
                continue
            if (
                event.get("event") not in JOB_EVENT_KINDS
                or not _is_int(event.get("id"))
                or not _is_int(user_id)
            ):
                self._note_invalid("malformed job event", event)
                continue
            job_type = event.get("type")
            tag = event.get("tag")
            job_id = event["id"]
            successor_id = event.get("successor_id")
            recipients = [
                client
                for group in (users or (), admins)
                for client in group
                if client._matches(job_type, tag, job_id, successor_id)
            ]
            if not recipients:
                continue
            text = self._serialise(job_event_to_client(event))
            if text is None:
                continue
            for client in recipients:
                client._offer(text)

    def handle_ipc(self, worker_id: str, msg: Mapping[str, Any]) -> bool:
        """Act on an IPC message from worker ``worker_id``.

        Handles kinds ``send-to-user``, ``broadcast`` and ``job-events`` and
        returns True for them (also when their payload was malformed, which is
        counted and logged); returns False for every other kind so the caller
        can handle lifecycle messages.
        """
        kind = msg.get("kind")
        if kind == "job-events":
            events = msg.get("events")
            if isinstance(events, list):
                self.publish_job_events(events)
            else:
                self._note_invalid(
                    f"job-events from worker {worker_id} without an events list", msg
                )
            return True
        if kind == "send-to-user":
            user_id = msg.get("user_id")
            message = msg.get("message")
            if (
                isinstance(user_id, int)
                and not isinstance(user_id, bool)
                and isinstance(message, Mapping)
            ):
                self.send_to_user(user_id, message)
            else:
                self._note_invalid(f"malformed send-to-user from worker {worker_id}", msg)
            return True
        if kind == "broadcast":
            message = msg.get("message")
            if isinstance(message, Mapping):
                self.broadcast(message)
            else:
                self._note_invalid(f"malformed broadcast from worker {worker_id}", msg)
            return True
        return False

    def statistics(self) -> HubStatistics:
        admins = len(self._admins)
        identified = sum(self._user_counts.values())
        return HubStatistics(
            clients=len(self._clients),
            admin_clients=admins,
            anonymous_clients=len(self._clients) - identified,
            users=len(self._by_user),
            published=self._published,
            delivered=self._delivered,
            dropped_clients=self._dropped_clients,
            invalid=self._invalid,
        )

    # ------------------------------------------------------------------ helpers

    def _serialise(self, message: Any) -> str | None:
        try:
            return _dumps(message)
        except (TypeError, ValueError, RecursionError):
            self._note_invalid("message is not serialisable as JSON", message)
            return None

    def _note_invalid(self, what: str, payload: Any) -> None:
        self._invalid += 1
        now = time.monotonic()
        if now - self._last_invalid_log >= INVALID_LOG_INTERVAL_SECONDS:
            self._last_invalid_log = now
            shown = repr(payload)
            if len(shown) > 200:
                shown = shown[:200] + "..."
            logger.warning("dropping %s (%d dropped so far): %s", what, self._invalid, shown)
