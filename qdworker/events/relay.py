"""Events between supervisors through Postgres (NOTIFY on :data:`CHANNEL`).

Several supervisors may share one database; a websocket client connected to any of them must
see the notifications and job events produced anywhere. Each supervisor runs one
:class:`Relay` next to its :class:`~qdworker.events.hub.Hub`:

* Outbound: the supervisor hands every ``send-to-user``, ``broadcast`` and ``job-events`` IPC
  message of its own children to :meth:`Relay.forward` (after its local hub). Forwarding only
  happens when someone can use it: job events only while another live supervisor reports
  websocket clients, notifications and broadcasts while another live supervisor exists. A
  background task coalesces queued messages into payloads of about
  :data:`PAYLOAD_TARGET_BYTES` and publishes each batch with one statement
  (``qdworker_publish``); a payload of 8000 bytes or more goes by reference through the
  ``worker_events`` table.
* Inbound: a dedicated autocommit connection LISTENs on :data:`CHANNEL` and hands every message
  from another sender (supervisors and the SQL functions ``qdworker_notify_user`` /
  ``qdworker_broadcast``) to the local hub. Own payloads are skipped by origin.
* Presence: every :data:`PRESENCE_SECONDS` (and at once when the local client count goes from
  zero to non-zero or back) the relay upserts its row in ``qdworker_supervisors`` and announces
  its client count on the channel; a clean exit deletes the row. Peers not seen for
  :data:`LIVE_SECONDS` are ignored.

Payload forms and the SQL functions are documented in ``sql/migrations/0003_events.sql``.

Resources and errors: :meth:`Relay.run` owns two psycopg connections (LISTEN/presence and
publish) and three tasks. Lost connections are reopened with backoff
(:data:`RECONNECT_MIN_SECONDS` doubling to :data:`RECONNECT_MAX_SECONDS`); a batch in flight
when its connection fails is queued again (so, rarely, sent twice). Delivery is best-effort and
bounded: the outbound queue holds :data:`MAX_QUEUE_ITEMS` messages (the oldest are dropped and
counted), a message over :data:`MAX_MESSAGE_BYTES` is not forwarded, notifications sent while
the LISTEN connection is down are missed. Nothing here raises into the caller of
:meth:`Relay.forward`; database errors are logged and retried, never propagated out of
:meth:`Relay.run`.

Not thread-safe: call everything from the trio thread that runs the hub.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import psycopg
import trio

from qdworker.db import statements
from qdworker.db.connection import CONNECT_TIMEOUT_SECONDS, redact, run_sync
from qdworker.errors import DatabaseError
from qdworker.events.hub import Hub

__all__ = [
    "CHANNEL",
    "CLEANUP_BATCH_ROWS",
    "CLEANUP_INTERVAL_SECONDS",
    "CLIENT_CHECK_SECONDS",
    "LIVE_SECONDS",
    "MAX_MESSAGE_BYTES",
    "MAX_PAYLOADS_PER_STATEMENT",
    "MAX_QUEUE_ITEMS",
    "PAYLOAD_TARGET_BYTES",
    "PRESENCE_SECONDS",
    "RECONNECT_MAX_SECONDS",
    "RECONNECT_MIN_SECONDS",
    "RETENTION_SECONDS",
    "SQL_ORIGIN",
    "Relay",
    "RelayStatistics",
]

logger = logging.getLogger(__name__)

CHANNEL: Final = "qdworker_events"
SQL_ORIGIN: Final = "sql"
"""Origin of payloads sent by ``qdworker_notify_user`` / ``qdworker_broadcast``."""

PRESENCE_SECONDS: Final = 5.0
"""Presence upsert (and peer refresh) interval."""
LIVE_SECONDS_FACTOR: Final = 3
LIVE_SECONDS: Final = LIVE_SECONDS_FACTOR * PRESENCE_SECONDS
"""A peer not seen for this long is considered gone."""
CLIENT_CHECK_SECONDS: Final = 0.05
"""How often the local hub's client count is checked for a 0 <-> non-zero change."""

PAYLOAD_TARGET_BYTES: Final = 7000
"""Coalesced NOTIFY payload size (Postgres refuses 8000 bytes or more)."""
MAX_PAYLOADS_PER_STATEMENT: Final = 64
MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest single message (or job event) forwarded; the SQL functions enforce the same."""
MAX_QUEUE_ITEMS: Final = 20_000
"""Outbound messages/job events waiting to be published; beyond this the oldest are dropped."""

RETENTION_SECONDS: Final = 300.0
"""Age after which by-reference bodies in ``worker_events`` are deleted."""
STALE_SUPERVISOR_SECONDS: Final = 3600.0
"""Age after which a crashed supervisor's presence row is deleted."""
CLEANUP_INTERVAL_SECONDS: Final = 60.0
CLEANUP_BATCH_ROWS: Final = 1000

RECONNECT_MIN_SECONDS: Final = 0.1
RECONNECT_MAX_SECONDS: Final = 10.0
LEAVE_TIMEOUT_SECONDS: Final = 2.0
"""Bound on deleting the presence row on a clean exit."""
LOG_INTERVAL_SECONDS: Final = 10.0
"""Minimum spacing of repeated warnings (drops, malformed payloads)."""

_SEPARATORS: Final = (",", ":")
_JOB_HEAD: Final = '{"kind":"job-events","events":['
_JOB_TAIL: Final = "]}"
_PAYLOAD_TAIL: Final = "]}"
_FORWARDED_KINDS: Final = frozenset({"send-to-user", "broadcast"})

Conn = psycopg.Connection[dict[str, Any]]


def _dumps(obj: Any) -> str:
    # ensure_ascii keeps len() equal to the UTF-8 byte count.
    return json.dumps(obj, separators=_SEPARATORS, allow_nan=False, ensure_ascii=True)


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


@dataclass(frozen=True, slots=True)
class _Peer:
    ws_clients: int
    seen: float  # trio clock


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
        presence_seconds: float = PRESENCE_SECONDS,
        max_queue_items: int = MAX_QUEUE_ITEMS,
    ) -> None:
        if not supervisor_id or supervisor_id == SQL_ORIGIN or len(supervisor_id) > 200:
            raise ValueError("supervisor_id must be 1-200 characters and not 'sql'")
        if presence_seconds <= 0:
            raise ValueError("presence_seconds must be > 0")
        if max_queue_items < 1:
            raise ValueError("max_queue_items must be >= 1")
        self._url = url
        self._hub = hub
        self._id = supervisor_id
        self._presence_seconds = presence_seconds
        self._live_seconds = LIVE_SECONDS_FACTOR * presence_seconds
        self._max_queue = max_queue_items
        self._head_prefix = '{"origin":' + _dumps(supervisor_id) + ',"seq":'
        self._seq = 0
        # outbound
        self._queue: deque[tuple[bool, str]] = deque()  # (is job event, JSON text)
        self._pending = trio.Event()
        # presence
        self._peers: dict[str, _Peer] = {}
        self._live_peers = 0
        self._peers_with_clients = 0
        #: Called (in the trio thread) when the number of peers with clients changes.
        self.on_peers_changed: Callable[[], None] | None = None
        self._announced_clients = 0
        self._presence_due = False
        self._wait_scope: trio.CancelScope | None = None
        self._changed = trio.Event()
        # statistics
        self._listen_conn: Conn | None = None
        self._publish_conn: Conn | None = None
        self._forwarded = 0
        self._payloads_sent = 0
        self._sent_by_reference = 0
        self._received = 0
        self._received_by_reference = 0
        self._dropped = 0
        self._lost_references = 0
        self._invalid = 0
        self._reconnects = 0
        self._last_warning = -LOG_INTERVAL_SECONDS

    @property
    def supervisor_id(self) -> str:
        return self._id

    def statistics(self) -> RelayStatistics:
        return RelayStatistics(
            connected=self._listen_conn is not None,
            publisher_connected=self._publish_conn is not None,
            forwarded=self._forwarded,
            payloads_sent=self._payloads_sent,
            sent_by_reference=self._sent_by_reference,
            received=self._received,
            received_by_reference=self._received_by_reference,
            dropped=self._dropped,
            lost_references=self._lost_references,
            invalid=self._invalid,
            queued=len(self._queue),
            peers=self._live_peers,
            peers_with_clients=self._peers_with_clients,
            reconnects=self._reconnects,
        )

    async def wait_until(self, predicate: Callable[[RelayStatistics], bool]) -> RelayStatistics:
        """Wait (without polling) until ``predicate(statistics())`` holds; return them."""
        while True:
            stats = self.statistics()
            if predicate(stats):
                return stats
            await self._changed.wait()

    # ---------------------------------------------------------------- outbound

    def forward(self, msg: Mapping[str, Any]) -> None:
        """Queue an IPC message of this supervisor's children for the other supervisors.

        Call it for every ``send-to-user``, ``broadcast`` and ``job-events`` message (other
        kinds are ignored). Never blocks, never raises: messages nobody can use are skipped,
        oversized or unserialisable ones are counted in ``dropped``, and a full queue drops
        its oldest entry.
        """
        kind = msg.get("kind")
        if kind == "job-events":
            if self._peers_with_clients == 0:
                return
            events = msg.get("events")
            if isinstance(events, list):
                for event in events:
                    if isinstance(event, Mapping):
                        self._enqueue(True, event)
        elif kind in _FORWARDED_KINDS:
            if self._live_peers == 0:
                return
            if kind == "broadcast":
                self._enqueue(False, {"kind": kind, "message": msg.get("message")})
            else:
                self._enqueue(
                    False,
                    {"kind": kind, "user_id": msg.get("user_id"), "message": msg.get("message")},
                )

    def _enqueue(self, is_job: bool, obj: Any) -> None:
        try:
            text = _dumps(obj)
        except (TypeError, ValueError, RecursionError):
            self._drop("an unserialisable message")
            return
        if len(text) > MAX_MESSAGE_BYTES:
            self._drop(f"a message of {len(text)} bytes (max {MAX_MESSAGE_BYTES})")
            return
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._drop(f"the oldest queued message (queue full at {self._max_queue})")
        self._queue.append((is_job, text))
        self._pending.set()

    def _drop(self, what: str) -> None:
        self._dropped += 1
        self._warn("not forwarding %s (%d dropped so far)", what, self._dropped)

    def _warn(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning >= LOG_INTERVAL_SECONDS:
            self._last_warning = now
            logger.warning(fmt, *args)

    def _take_batch(self) -> tuple[list[str], list[tuple[bool, str]]]:
        """Pop queued items into at most :data:`MAX_PAYLOADS_PER_STATEMENT` payloads of about
        :data:`PAYLOAD_TARGET_BYTES` (a single larger item gets a payload of its own)."""
        queue = self._queue
        payloads: list[str] = []
        taken: list[tuple[bool, str]] = []
        while queue and len(payloads) < MAX_PAYLOADS_PER_STATEMENT:
            self._seq += 1
            head = f'{self._head_prefix}{self._seq},"messages":['
            size = len(head) + len(_PAYLOAD_TAIL)
            parts: list[str] = []
            jobs: list[str] = []
            while queue:
                is_job, text = queue[0]
                if is_job:
                    extra = len(text) + (
                        1 if jobs else len(_JOB_HEAD) + len(_JOB_TAIL) + (1 if parts else 0)
                    )
                else:
                    extra = len(text) + (1 if parts or jobs else 0)
                if (parts or jobs) and size + extra > PAYLOAD_TARGET_BYTES:
                    break
                taken.append(queue.popleft())
                size += extra
                if is_job:
                    jobs.append(text)
                    continue
                if jobs:
                    parts.append(_JOB_HEAD + ",".join(jobs) + _JOB_TAIL)
                    jobs = []
                parts.append(text)
            if jobs:
                parts.append(_JOB_HEAD + ",".join(jobs) + _JOB_TAIL)
            payloads.append(head + ",".join(parts) + _PAYLOAD_TAIL)
        return payloads, taken

    def _requeue(self, items: list[tuple[bool, str]]) -> None:
        self._queue.extendleft(reversed(items))
        while len(self._queue) > self._max_queue:
            self._queue.popleft()
            self._drop("the oldest queued message (queue full after a failed batch)")

    async def _send_forever(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        while True:
            try:
                self._publish_conn = conn = await self._connect("qdworker-relay-publish")
                delay = RECONNECT_MIN_SECONDS
                await self._send(conn)
            except (psycopg.Error, DatabaseError, OSError) as exc:
                logger.warning("events relay: publishing connection failed (%s); retrying", exc)
            finally:
                conn_, self._publish_conn = self._publish_conn, None
                if conn_ is not None:
                    conn_.close()
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _send(self, conn: Conn) -> None:
        query = statements.get("events_publish")
        while True:
            while not self._queue:
                self._pending = trio.Event()
                await self._pending.wait()
            payloads, items = self._take_batch()
            params = {"origin": self._id, "payloads": payloads}
            try:
                rows = await run_sync(conn, _fetchall, conn, query, params)
            except BaseException:
                self._requeue(items)
                raise
            self._forwarded += len(items)
            self._payloads_sent += len(payloads)
            self._sent_by_reference += int(rows[0]["refs"] or 0)
            self._notify_changed()

    # ----------------------------------------------------------------- inbound

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled.

        Started once LISTEN is in place and this supervisor's presence is recorded (or after
        the first failed attempt, so a database outage does not block start-up). On
        cancellation the presence row is deleted (bounded by :data:`LEAVE_TIMEOUT_SECONDS`)
        and both connections are closed.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_forever)
            nursery.start_soon(self._watch_clients)
            await nursery.start(self._listen_forever)
            task_status.started()

    def clients_changed(self) -> None:
        """Re-read the hub's client count; announce a 0 <-> non-zero change at once.

        Called every :data:`CLIENT_CHECK_SECONDS` by :meth:`run`; a caller that knows a
        client just connected may call it too. Never blocks.
        """
        count = self._hub.client_count
        if (count > 0) != (self._announced_clients > 0) and not self._presence_due:
            self._presence_due = True
            if self._wait_scope is not None:
                self._wait_scope.cancel()

    async def _watch_clients(self) -> None:
        while True:
            await trio.sleep(CLIENT_CHECK_SECONDS)
            self.clients_changed()

    async def _listen_forever(self, *, task_status: trio.TaskStatus[None]) -> None:
        delay = RECONNECT_MIN_SECONDS
        started = False
        next_cleanup = trio.current_time()
        while True:
            try:
                self._listen_conn = conn = await self._connect("qdworker-relay-listen")
                await run_sync(conn, _execute, conn, statements.get("events_listen"), None)
                await self._presence_tick(conn, cleanup=False)
                if started:
                    self._reconnects += 1
                    self._notify_changed()
                    logger.info("events relay: LISTEN connection restored")
                else:
                    task_status.started()
                    started = True
                delay = RECONNECT_MIN_SECONDS
                try:
                    await self._listen(conn, next_cleanup)
                except trio.Cancelled:
                    await self._leave(conn)
                    raise
            except (psycopg.Error, DatabaseError, OSError) as exc:
                logger.warning("events relay: LISTEN connection lost (%s); reconnecting", exc)
            finally:
                conn_, self._listen_conn = self._listen_conn, None
                if conn_ is not None:
                    conn_.close()
                self._notify_changed()
            if not started:
                task_status.started()
                started = True
            next_cleanup = trio.current_time()
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _listen(self, conn: Conn, next_cleanup: float) -> None:
        fd = conn.fileno()
        next_presence = trio.current_time() + self._presence_seconds
        while True:
            await self._drain(conn)
            now = trio.current_time()
            if self._presence_due or now >= next_presence:
                cleanup = now >= next_cleanup
                await self._presence_tick(conn, cleanup=cleanup)
                if cleanup:
                    next_cleanup = now + CLEANUP_INTERVAL_SECONDS
                next_presence = trio.current_time() + self._presence_seconds
                continue
            with trio.CancelScope(deadline=next_presence) as scope:
                self._wait_scope = scope
                await trio.lowlevel.wait_readable(fd)
            self._wait_scope = None

    async def _drain(self, conn: Conn) -> None:
        """Handle every buffered notification; statements run while handling may buffer more,
        so loop until none is left (they would never make the socket readable)."""
        while True:
            notes = list(conn.notifies(timeout=0))
            if not notes:
                return
            for note in notes:
                await self._handle(conn, note.payload)

    async def _handle(self, conn: Conn, payload: str) -> None:
        try:
            envelope = json.loads(payload)
        except ValueError:
            self._note_invalid("a non-JSON payload", payload)
            return
        if not isinstance(envelope, dict):
            self._note_invalid("a payload that is not an object", payload)
            return
        origin = envelope.get("origin")
        if origin == self._id:
            return
        if "presence" in envelope:
            self._on_presence(origin, envelope["presence"])
            return
        if "ref" in envelope:
            ref = envelope["ref"]
            if not _is_int(ref):
                self._note_invalid("a payload with a malformed ref", payload)
                return
            rows = await run_sync(
                conn, _fetchall, conn, statements.get("events_fetch"), {"id": ref}
            )
            if not rows:
                self._lost_references += 1
                self._warn("events relay: event body %d is gone (cleaned up?)", ref)
                return
            self._received_by_reference += 1
            try:
                envelope = json.loads(rows[0]["body"])
            except ValueError:
                envelope = None
            if not isinstance(envelope, dict):
                self._note_invalid("a stored body that is not an object", ref)
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
            if msg.get("kind") == "job-events" and isinstance(events, list):
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
        self._notify_changed()

    def _note_invalid(self, what: str, payload: Any) -> None:
        self._invalid += 1
        self._warn("events relay: ignoring %s (%d so far): %.200r", what, self._invalid, payload)

    # ---------------------------------------------------------------- presence

    def _on_presence(self, origin: Any, value: Any) -> None:
        if not isinstance(origin, str):
            self._note_invalid("a presence without origin", origin)
            return
        if value is None:
            self._peers.pop(origin, None)
        elif _is_int(value) and value >= 0:
            self._peers[origin] = _Peer(value, trio.current_time())
        else:
            self._note_invalid("a malformed presence", value)
            return
        self._recount()

    def _recount(self) -> None:
        horizon = trio.current_time() - self._live_seconds
        self._peers = {k: p for k, p in self._peers.items() if p.seen >= horizon}
        self._live_peers = len(self._peers)
        before = self._peers_with_clients
        self._peers_with_clients = sum(1 for p in self._peers.values() if p.ws_clients > 0)
        self._notify_changed()
        if self.on_peers_changed is not None and before != self._peers_with_clients:
            self.on_peers_changed()

    async def _presence_tick(self, conn: Conn, *, cleanup: bool) -> None:
        """Upsert and announce this supervisor, refresh the peers, maybe clean up old rows."""
        self._presence_due = False
        count = self._hub.client_count
        rows = await run_sync(conn, self._presence_sync, conn, count, cleanup)
        self._announced_clients = count
        now = trio.current_time()
        self._peers = {
            row["id"]: _Peer(int(row["ws_clients"]), now - max(0.0, float(row["age_seconds"])))
            for row in rows
        }
        self._recount()

    def _presence_sync(self, conn: Conn, ws_clients: int, cleanup: bool) -> list[dict[str, Any]]:
        conn.execute(
            statements.get("events_presence").encode(),
            {
                "id": self._id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "ws_clients": ws_clients,
            },
        )
        rows = conn.execute(
            statements.get("events_peers").encode(),
            {"id": self._id, "live_seconds": self._live_seconds},
        ).fetchall()
        if cleanup:
            done = conn.execute(
                statements.get("events_cleanup").encode(),
                {
                    "limit": CLEANUP_BATCH_ROWS,
                    "retention_seconds": RETENTION_SECONDS,
                    "stale_seconds": STALE_SUPERVISOR_SECONDS,
                },
            ).fetchone()
            if done and (done["events"] or done["supervisors"]):
                logger.debug(
                    "events relay: deleted %d old event bodies, %d stale supervisors",
                    done["events"],
                    done["supervisors"],
                )
        return rows

    async def _leave(self, conn: Conn) -> None:
        """Delete this supervisor's presence row (shielded, bounded; failures are logged)."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + LEAVE_TIMEOUT_SECONDS
            try:
                await run_sync(
                    conn, _execute, conn, statements.get("events_leave"), {"id": self._id}
                )
            except (psycopg.Error, DatabaseError, OSError) as exc:
                logger.warning("events relay: could not delete the presence row (%s)", exc)
        if scope.cancelled_caught:
            logger.warning("events relay: deleting the presence row timed out")

    # ----------------------------------------------------------------- helpers

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _connect(self, application_name: str) -> Conn:
        """Open an autocommit connection; :class:`DatabaseError` (password redacted) on failure."""
        url = self._url

        def open_() -> Conn:
            return psycopg.connect(
                url,
                autocommit=True,
                row_factory=psycopg.rows.dict_row,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name=application_name,
            )

        try:
            return await trio.to_thread.run_sync(open_, abandon_on_cancel=True)
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot connect to {redact(url)}: {str(exc).strip()}", sqlstate=exc.sqlstate
            ) from exc


def _execute(conn: Conn, query: str, params: Mapping[str, Any] | None) -> None:
    conn.execute(query.encode(), params)


def _fetchall(conn: Conn, query: str, params: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    return conn.execute(query.encode(), params).fetchall()
