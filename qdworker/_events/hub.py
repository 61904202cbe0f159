"""In-process fan-out of worker traffic to websocket clients.

The hub sits between the supervisor's IPC readers (publishers) and the
websocket connection handlers (consumers).  Publishing is synchronous and
never blocks or awaits: every connected client owns a bounded queue of
pre-serialised JSON texts; when a client's queue is full the client is marked
*overflowed*, its queue is freed, and its handler disconnects it (close code
:data:`qdworker._events.websocket.CLOSE_CLIENT_TOO_SLOW`).  Nobody else is
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
:mod:`qdworker._protocol`); clients receive
``{"type": "job", "data": {...}}`` with camelCase keys.

Errors: nothing published raises.  Malformed events or messages are dropped,
counted in :attr:`HubStatistics.invalid` and logged at most once per
:data:`INVALID_LOG_INTERVAL_SECONDS`; :class:`Hub` raises :class:`ValueError`
only for invalid queue bounds.  Resources: the per-client queues (bounded by
``client_queue_size`` messages and ``client_queue_chars`` characters each)
and the client indexes; a removed client's queue is freed at once.

This module is the public face of the hub; the parts live in private modules:
``_subscription`` (subscriptions and their wire form), ``_client_queue``
(:class:`HubClient`), ``_client_registry`` (who is connected) and
``_hub_statistics`` (counters).  Here: routing, job events and IPC messages.

The hub is not thread-safe: call it only from the trio thread that runs the
websocket server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from .. import _protocol as protocol
from ._client_queue import DEFAULT_CLIENT_QUEUE_CHARS, DEFAULT_CLIENT_QUEUE_MESSAGES, HubClient
from ._client_registry import ClientRegistry
from ._hub_statistics import HubCounters, HubStatistics
from ._subscription import Subscription, SubscriptionFilter
from .tokens import Identity

_JSON_SEPARATORS: Final = (",", ":")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=_JSON_SEPARATORS, allow_nan=False)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Hub:
    """Fan-out point; see the module docstring for routing rules."""

    def __init__(
        self,
        *,
        client_queue_size: int = DEFAULT_CLIENT_QUEUE_MESSAGES,
        client_queue_chars: int = DEFAULT_CLIENT_QUEUE_CHARS,
    ) -> None:
        if client_queue_size < 1 or client_queue_chars < 1:
            raise ValueError("client_queue_size and client_queue_chars must be >= 1")
        self._client_queue_size = client_queue_size
        self._client_queue_chars = client_queue_chars
        self._registry = ClientRegistry()
        self._counters = HubCounters()
        self._next_client_id = 1
        #: Called (in the trio thread) after a client is added or removed.
        self.on_clients_changed: Callable[[], None] | None = None

    # ------------------------------------------------------------------ clients

    @property
    def client_count(self) -> int:
        return len(self._registry.clients)

    def user_client_count(self, user_id: int) -> int:
        """Connected clients identified as ``user_id`` (admins included)."""
        return self._registry.user_client_count(user_id)

    def add_client(self, identity: Identity | None = None) -> HubClient:
        """Register a consumer; ``None`` means anonymous (broadcasts only)."""
        client = HubClient(
            self._counters,
            self._next_client_id,
            None,
            self._client_queue_size,
            self._client_queue_chars,
        )
        self._next_client_id += 1
        self._registry.add(client, identity)
        if self.on_clients_changed is not None:
            self.on_clients_changed()
        return client

    def remove_client(self, client: HubClient) -> None:
        """Unregister a consumer (idempotent); wakes its pending receive."""
        if client._closed:
            return
        self._registry.remove(client)
        client._close()
        if self.on_clients_changed is not None:
            self.on_clients_changed()

    def set_identity(self, client: HubClient, identity: Identity | None) -> None:
        """Change who ``client`` is (register / re-register)."""
        if client._closed:
            return
        self._registry.set_identity(client, identity)

    def set_subscription(self, client: HubClient, subscription: Subscription) -> None:
        """Replace the job-event narrowing of ``client``."""
        client._filter = SubscriptionFilter(subscription)

    # --------------------------------------------------------------- publishing

    def broadcast(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` (a JSON object) to every client."""
        self._counters.published += 1
        clients = self._registry.clients
        if not clients:
            return
        text = self._serialise(message)
        if text is None:
            return
        for client in clients:
            client._offer(text)

    def send_to_user(self, user_id: int, message: Mapping[str, Any]) -> None:
        """Send ``message`` to ``user_id``'s clients and to admin clients."""
        self._counters.published += 1
        registry = self._registry
        users = registry.by_user.get(user_id)
        if not users and not registry.admins:
            return
        text = self._serialise(message)
        if text is None:
            return
        for group in (users or (), registry.admins):
            for client in group:
                client._offer(text)

    def publish_job_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Route worker job events (see module docstring).  Never blocks."""
        counters = self._counters
        by_user = self._registry.by_user
        admins = self._registry.admins
        if not by_user and not admins:
            if isinstance(events, list):
                counters.published += len(events)
            else:
                counters.published += sum(1 for _ in events)
            return
        for event in events:
            counters.published += 1
            if not isinstance(event, Mapping):
                counters.note_invalid("job event is not an object", event)
                continue
            user_id = event.get("user_id")
            users = by_user.get(user_id) if isinstance(user_id, int) else None
            if not users and not admins:
                continue
            if (
                event.get("event") not in protocol.JOB_EVENT_KINDS
                or not _is_int(event.get("id"))
                or not _is_int(user_id)
            ):
                counters.note_invalid("malformed job event", event)
                continue
            job_type = event.get("type")
            tag = event.get("tag")
            job_id = event["id"]
            successor_id = event.get("successor_id")
            recipients = [
                client
                for group in (users or (), admins)
                for client in group
                if client._filter.matches(job_type, tag, job_id, successor_id)
            ]
            if not recipients:
                continue
            text = self._serialise(protocol.job_event_for_client(event))
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
        if kind == protocol.JOB_EVENTS:
            events = msg.get("events")
            if isinstance(events, list):
                self.publish_job_events(events)
            else:
                self._note_invalid(
                    f"job-events from worker {worker_id} without an events list", msg
                )
            return True
        if kind == protocol.SEND_TO_USER:
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
        if kind == protocol.BROADCAST:
            message = msg.get("message")
            if isinstance(message, Mapping):
                self.broadcast(message)
            else:
                self._note_invalid(f"malformed broadcast from worker {worker_id}", msg)
            return True
        return False

    def statistics(self) -> HubStatistics:
        registry = self._registry
        counters = self._counters
        clients = len(registry.clients)
        return HubStatistics(
            clients=clients,
            admin_clients=len(registry.admins),
            anonymous_clients=clients - registry.identified_count(),
            users=len(registry.by_user),
            published=counters.published,
            delivered=counters.delivered,
            dropped_clients=counters.dropped_clients,
            invalid=counters.invalid,
        )

    # ------------------------------------------------------------------ helpers

    def _serialise(self, message: Any) -> str | None:
        try:
            return _dumps(message)
        except (TypeError, ValueError, RecursionError):
            self._note_invalid("message is not serialisable as JSON", message)
            return None

    def _note_invalid(self, what: str, payload: Any) -> None:
        self._counters.note_invalid(what, payload)
