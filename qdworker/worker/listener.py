"""The dedicated LISTEN connection: wakes the claimer, relays job cancellations.

One autocommit connection LISTENs on ``qdworker_jobs`` (inserts, releases) and
``qdworker_cancel`` (``qdworker_cancel_job`` on a running job). It waits with
``trio.lowlevel.wait_readable`` on the socket and drains ``notifies(timeout=0)`` before every
wait: notifications that arrived while another statement ran on this connection sit in
psycopg's buffer and never make the socket readable.

If the connection drops, :class:`Listener` reconnects with backoff and sets ``wake`` after
reconnecting (a notification may have been lost); meanwhile the claimer polls.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import trio

from .wakeup import Wakeup

__all__ = ["CANCEL_CHANNEL", "JOBS_CHANNEL", "Listener", "ListenerStatistics"]

logger = logging.getLogger(__name__)

JOBS_CHANNEL = "qdworker_jobs"
CANCEL_CHANNEL = "qdworker_cancel"
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 10.0
#: Idle connections are checked this often (a dead TCP peer otherwise goes unnoticed).
KEEPALIVE_SECONDS = 30.0


@dataclass(frozen=True)
class ListenerStatistics:
    connected: bool
    notifications: int
    reconnects: int


class Listener:
    """Owns the LISTEN connection. ``on_cancel(job_id, reason)`` is called in the trio thread."""

    def __init__(self, url: str, wake: Wakeup, on_cancel: Callable[[int, str], None]) -> None:
        self._url = url
        self._wake = wake
        self._on_cancel = on_cancel
        self._conn: psycopg.Connection[Any] | None = None
        self._notifications = 0
        self._reconnects = 0

    def statistics(self) -> ListenerStatistics:
        return ListenerStatistics(self._conn is not None, self._notifications, self._reconnects)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled. Started once the first LISTEN is in place (or failed once)."""
        delay = RECONNECT_MIN_SECONDS
        started = False
        while True:
            try:
                self._conn = await trio.to_thread.run_sync(self._connect, abandon_on_cancel=True)
                if not started:
                    task_status.started()
                    started = True
                else:
                    self._reconnects += 1
                    logger.info("LISTEN connection restored")
                self._wake.set()  # something may have been missed while disconnected
                delay = RECONNECT_MIN_SECONDS
                await self._listen(self._conn)
            except (psycopg.Error, OSError) as exc:
                logger.warning("LISTEN connection lost (%s); polling until it is back", exc)
            finally:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()
            if not started:
                task_status.started()
                started = True
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._url, autocommit=True, application_name="qdworker-listen")
        conn.execute(f"LISTEN {JOBS_CHANNEL}; LISTEN {CANCEL_CHANNEL}")
        return conn

    async def _listen(self, conn: psycopg.Connection[Any]) -> None:
        fd = conn.fileno()
        while True:
            self._drain(conn)
            with trio.move_on_after(KEEPALIVE_SECONDS) as idle:
                await trio.lowlevel.wait_readable(fd)
            if idle.cancelled_caught:
                await trio.to_thread.run_sync(conn.execute, "SELECT 1", abandon_on_cancel=True)

    def _drain(self, conn: psycopg.Connection[Any]) -> None:
        woke = False
        for note in conn.notifies(timeout=0):
            self._notifications += 1
            if note.channel == CANCEL_CHANNEL:
                self._cancel(note.payload)
            else:
                woke = True
        if woke:
            self._wake.set()

    def _cancel(self, payload: str) -> None:
        try:
            body = json.loads(payload)
            job_id, reason = int(body["id"]), str(body.get("reason") or "cancelled by request")
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed cancel notification %.200r", payload)
            return
        self._on_cancel(job_id, reason)
