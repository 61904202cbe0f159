"""Events between supervisors through Postgres (NOTIFY on :data:`CHANNEL`).

Several supervisors may share one database; a websocket client connected to any of them must
see the notifications and job events produced anywhere. Each supervisor runs one
:class:`Relay` next to its :class:`~qdworker._events.hub.Hub`, made of three parts:

* outbound (:mod:`.relay_publisher`): the supervisor hands every ``send-to-user``,
  ``broadcast`` and ``job-events`` IPC message of its own children to :meth:`Relay.forward`
  (after its local hub). Forwarding only happens when someone can use it: job events only
  while another live supervisor reports websocket clients, notifications and broadcasts while
  another live supervisor exists;
* inbound (here): the one LISTEN helper (:class:`~qdworker._db.listen.Listener`) hands every
  message from another sender (supervisors and the SQL functions ``qdworker_notify_user`` /
  ``qdworker_broadcast``) to the local hub; own payloads are skipped by origin, bodies sent by
  reference are fetched from ``worker_events``;
* presence (:mod:`.presence`): who else is alive and has clients.

Payload forms and the SQL functions are documented in ``sql/migrations/0003_events.sql``.

Resources and errors: :meth:`Relay.run` owns four connections (LISTEN, publish, presence,
fetch), each a :class:`~qdworker._db.connection.Link` that reopens itself. Delivery is
best-effort and bounded (see the parts); nothing here raises into the caller of
:meth:`Relay.forward`, and database errors never end :meth:`Relay.run`. Notifications sent
while the LISTEN connection is down are missed; after it is back, presence is refreshed at once.

Not thread-safe: call everything from the trio thread that runs the hub.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

from .. import _protocol as protocol
from .._db import statements
from .._db.connect import DbOptions
from .._db.connection import Link
from .._db.listen import Listener, Listening, Notification
from .._logs import module_logger
from ..errors import DatabaseError
from .hub import Hub
from .presence import PRESENCE_SECONDS, Presence
from .relay_publisher import Publisher

logger = module_logger(__name__)

CHANNEL: Final = "qdworker_events"
SQL_ORIGIN: Final = "sql"
"""Origin of payloads sent by ``qdworker_notify_user`` / ``qdworker_broadcast``."""
MAX_QUEUE_ITEMS: Final = 20_000
"""Outbound messages/job events waiting to be published; beyond this the oldest are dropped."""
LOG_INTERVAL_SECONDS: Final = 10.0
"""Minimum spacing of repeated warnings (malformed payloads, lost references)."""
NOTIFICATION_BUFFER: Final = 1000

_FORWARDED_KINDS: Final = frozenset({protocol.SEND_TO_USER, protocol.BROADCAST})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class RelayStatistics:
    """Point-in-time counters. Messages count one per notification/broadcast and one per job
    event. ``dropped`` counts outbound messages lost to a full queue, over
    :data:`MAX_MESSAGE_BYTES` or not serialisable; ``lost_references`` counts by-reference
    payloads whose body was already deleted; ``invalid`` counts malformed inbound payloads."""

    connected: bool
    publisher_connected: bool
    forwarded: int
    payloads_sent: int
    sent_by_reference: int
    received: int
    received_by_reference: int
    dropped: int
    lost_references: int
    invalid: int
    queued: int
    peers: int
    peers_with_clients: int
    reconnects: int


class Relay:
    """Relays hub traffic between supervisors; see the module docstring.

    ``supervisor_id`` must be unique among the supervisors sharing the database (and is not
    ``"sql"``); ``hub`` is this supervisor's hub, whose ``client_count`` is advertised.
    """

    def __init__(
        self,
        url: str,
        hub: Hub,
        supervisor_id: str,
        *,
        options: DbOptions | None = None,
        presence_seconds: float = PRESENCE_SECONDS,
        max_queue_items: int = MAX_QUEUE_ITEMS,
    ) -> None:
        if not supervisor_id or supervisor_id == SQL_ORIGIN or len(supervisor_id) > 200:
            raise ValueError("supervisor_id must be 1-200 characters and not 'sql'")
        if presence_seconds <= 0:
            raise ValueError("presence_seconds must be > 0")
        if max_queue_items < 1:
            raise ValueError("max_queue_items must be >= 1")
        options = options or DbOptions()
        self._hub = hub
        self._id = supervisor_id
        self._listener = Listener(url, (CHANNEL,), options, purpose="relay-listen")
        self._fetch = Link(url, "relay-fetch", options)
        self._publisher = Publisher(url, options, supervisor_id, max_queue_items)
        self._presence = Presence(
            url,
            options,
            supervisor_id,
            lambda: hub.client_count,
            presence_seconds=presence_seconds,
        )
        self._received = 0
        self._received_by_reference = 0
        self._lost_references = 0
        self._invalid = 0
        self._reconnects = 0
        self._last_warning = -LOG_INTERVAL_SECONDS

    @property
    def supervisor_id(self) -> str:
        return self._id

    @property
    def on_peers_changed(self) -> Callable[[], None] | None:
        """Called (in the trio thread) when the number of peers with clients changes."""
        return self._presence.on_peers_changed

    @on_peers_changed.setter
    def on_peers_changed(self, callback: Callable[[], None] | None) -> None:
        self._presence.on_peers_changed = callback

    def statistics(self) -> RelayStatistics:
        publisher, presence = self._publisher, self._presence
        return RelayStatistics(
            connected=self._listener.connected,
            publisher_connected=publisher.connected,
            forwarded=publisher.forwarded,
            payloads_sent=publisher.payloads_sent,
            sent_by_reference=publisher.sent_by_reference,
            received=self._received,
            received_by_reference=self._received_by_reference,
            dropped=publisher.dropped,
            lost_references=self._lost_references,
            invalid=self._invalid,
            queued=publisher.queued,
            peers=presence.live_peers,
            peers_with_clients=presence.peers_with_clients,
            reconnects=self._reconnects,
        )

    # ---------------------------------------------------------------- outbound

    def forward(self, msg: Mapping[str, Any]) -> None:
        """Queue an IPC message of this supervisor's children for the other supervisors.

        Call it for every ``send-to-user``, ``broadcast`` and ``job-events`` message (other
        kinds are ignored). Never blocks, never raises: messages nobody can use are skipped,
        oversized or unserialisable ones are counted in ``dropped``, and a full queue drops
        its oldest entry.
        """
        kind = msg.get("kind")
        if kind == protocol.JOB_EVENTS:
            if self._presence.peers_with_clients == 0:
                return
            events = msg.get("events")
            if isinstance(events, list):
                for event in events:
                    if isinstance(event, Mapping):
                        self._publisher.enqueue(True, event)
        elif kind in _FORWARDED_KINDS:
            if self._presence.live_peers == 0:
                return
            if kind == protocol.BROADCAST:
                self._publisher.enqueue(False, {"kind": kind, "message": msg.get("message")})
            else:
                self._publisher.enqueue(
                    False,
                    {"kind": kind, "user_id": msg.get("user_id"), "message": msg.get("message")},
                )

    # ----------------------------------------------------------------- service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled.

        Started once LISTEN is in place and this supervisor's presence is recorded (or after
        the first failed attempt, so a database outage does not block start-up). On
        cancellation the presence row is deleted (bounded) and the connections are closed.
        """
        send, receive = trio.open_memory_channel[Notification | Listening](NOTIFICATION_BUFFER)
        async with self._fetch, trio.open_nursery() as nursery:
            nursery.start_soon(self._publisher.run)
            await nursery.start(self._listener.run, send)
            await nursery.start(self._presence.run)
            nursery.start_soon(self._inbound, receive)
            task_status.started()

    async def _inbound(self, receive: trio.MemoryReceiveChannel[Notification | Listening]) -> None:
        async for item in receive:
            if isinstance(item, Listening):
                if item.reconnected:
                    self._reconnects += 1
                    self._presence.tick_now()
            else:
                await self._handle(item.payload)

    async def _handle(self, payload: str) -> None:
        envelope = self._envelope(payload)
        if envelope is None:
            return
        origin = envelope.get("origin")
        if origin == self._id:
            return
        if "presence" in envelope:
            self._on_presence(origin, envelope["presence"])
            return
        if "ref" in envelope:
            envelope = await self._fetch_body(envelope["ref"], payload)
            if envelope is None:
                return
        messages = envelope.get("messages")
        if not isinstance(messages, list):
            self._note_invalid("a payload without a messages list", payload)
            return
        worker_id = f"relay:{origin}"
        for msg in messages:
            if not isinstance(msg, dict):
                self._note_invalid("a message that is not an object", msg)
                continue
            events = msg.get("events")
            if msg.get("kind") == protocol.JOB_EVENTS and isinstance(events, list):
                # One event per scheduling round: a websocket writer sends one message per
                # round, so a burst from a peer cannot outrun (and overflow) its clients.
                for event in events:
                    self._hub.publish_job_events((event,))
                    self._received += 1
                    await trio.lowlevel.checkpoint()
            elif self._hub.handle_ipc(worker_id, msg):
                self._received += 1
                await trio.lowlevel.checkpoint()
            else:
                self._note_invalid("a message of an unknown kind", msg)

    def _envelope(self, payload: str) -> dict[str, Any] | None:
        try:
            envelope = json.loads(payload)
        except ValueError:
            self._note_invalid("a non-JSON payload", payload)
            return None
        if not isinstance(envelope, dict):
            self._note_invalid("a payload that is not an object", payload)
            return None
        return envelope

    async def _fetch_body(self, ref: Any, payload: str) -> dict[str, Any] | None:
        if not _is_int(ref):
            self._note_invalid("a payload with a malformed ref", payload)
            return None
        try:
            rows = await self._fetch.execute(
                statements.get("events_fetch"), {"id": ref}, idempotent=True
            )
        except DatabaseError as exc:
            self._warn("events relay: cannot fetch event body %d (%s)", ref, exc)
            return None
        if not rows:
            self._lost_references += 1
            self._warn("events relay: event body %d is gone (cleaned up?)", ref)
            return None
        self._received_by_reference += 1
        envelope = self._envelope(rows[0]["body"])
        if envelope is None:
            self._note_invalid("a stored body that is not an object", ref)
        return envelope

    def _on_presence(self, origin: Any, value: Any) -> None:
        if not isinstance(origin, str):
            self._note_invalid("a presence without origin", origin)
        elif value is None or (_is_int(value) and value >= 0):
            self._presence.on_presence(origin, value)
        else:
            self._note_invalid("a malformed presence", value)

    def _note_invalid(self, what: str, payload: Any) -> None:
        self._invalid += 1
        self._warn("events relay: ignoring %s (%d so far): %.200r", what, self._invalid, payload)

    def _warn(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning >= LOG_INTERVAL_SECONDS:
            self._last_warning = now
            logger.warning(fmt, *args)
