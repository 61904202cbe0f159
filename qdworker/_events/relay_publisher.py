"""Outbound half of the events relay: this supervisor's messages, batched into NOTIFY payloads.

:meth:`Publisher.enqueue` queues one message (a notification, a broadcast or one job event)
as JSON text; :meth:`Publisher.run` coalesces queued messages into payloads of about
:data:`PAYLOAD_TARGET_BYTES` (job events of one payload share one ``job-events`` message) and
publishes each batch with one statement (``qdworker_publish``, which sends a payload of 8000
bytes or more by reference through ``worker_events``).

Bounded and best-effort: at most ``max_queue_items`` messages wait (the oldest are dropped
and counted); a message over :data:`MAX_MESSAGE_BYTES` is not sent. While the database is away
the queue waits (the publishing connection is a :class:`~qdworker._db.connection.Link`); a batch
cut off by a broken connection is queued again, so it may, rarely, be delivered twice.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any, Final

import trio

from .._db import statements
from .._db.connect import DbOptions
from .._db.connection import Link
from .._logs import module_logger
from .._protocol import JOB_EVENTS, MAX_MESSAGE_BYTES
from ..errors import DatabaseError

logger = module_logger(__name__)

PAYLOAD_TARGET_BYTES: Final = 7000
"""Coalesced NOTIFY payload size (Postgres refuses 8000 bytes or more)."""
MAX_PAYLOADS_PER_STATEMENT: Final = 64
LOG_INTERVAL_SECONDS: Final = 10.0
"""Minimum spacing of repeated warnings (drops)."""
ERROR_PAUSE_SECONDS: Final = 1.0

_SEPARATORS: Final = (",", ":")
_JOB_HEAD: Final = '{"kind":"' + JOB_EVENTS + '","events":['
_JOB_TAIL: Final = "]}"
_PAYLOAD_TAIL: Final = "]}"


def dumps(obj: Any) -> str:
    """Compact JSON; ``ensure_ascii`` keeps ``len()`` equal to the UTF-8 byte count."""
    return json.dumps(obj, separators=_SEPARATORS, allow_nan=False, ensure_ascii=True)


class Publisher:
    """Owns the publishing connection and the outbound queue (see the module docstring)."""

    def __init__(self, url: str, options: DbOptions, origin: str, max_queue_items: int) -> None:
        self._link = Link(url, "relay-publish", options)
        self._origin = origin
        self._max_queue = max_queue_items
        self._head_prefix = '{"origin":' + dumps(origin) + ',"seq":'
        self._seq = 0
        self._queue: deque[tuple[bool, str]] = deque()  # (is job event, JSON text)
        self._pending = trio.Event()
        self._last_warning = -LOG_INTERVAL_SECONDS
        self.forwarded = 0
        self.payloads_sent = 0
        self.sent_by_reference = 0
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def queued(self) -> int:
        return len(self._queue)

    def enqueue(self, is_job: bool, obj: Any) -> None:
        """Queue one message. Never blocks, never raises: see the module docstring."""
        try:
            text = dumps(obj)
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
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_warning >= LOG_INTERVAL_SECONDS:
            self._last_warning = now
            logger.warning(
                "events relay: not forwarding %s (%d dropped so far)", what, self.dropped
            )

    def take_batch(self) -> tuple[list[str], list[tuple[bool, str]]]:
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

    async def run(self) -> None:
        """Publish until cancelled; database errors are logged and retried, never raised."""
        query = statements.get("events_publish")
        async with self._link:
            while True:
                while not self._queue:
                    self._pending = trio.Event()
                    await self._pending.wait()
                payloads, items = self.take_batch()
                params = {"origin": self._origin, "payloads": payloads}
                try:
                    rows = await self._link.execute(query, params)
                except DatabaseError as exc:
                    self._requeue(items)
                    logger.debug("events relay: publishing failed (%s); retrying", exc)
                    await trio.sleep(ERROR_PAUSE_SECONDS)
                    continue
                except BaseException:
                    self._requeue(items)
                    raise
                self.forwarded += len(items)
                self.payloads_sent += len(payloads)
                self.sent_by_reference += int(rows[0]["refs"] or 0)
