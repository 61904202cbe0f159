"""Lease renewal and the stuck-handler watchdog, in a thread of their own.

A claimed job's lease (``QDWORKER_LEASE_SECONDS``) is renewed every third of a lease for every
row this worker owns, by one statement. It runs in a plain thread with its own connection so
that a handler that blocks the trio loop cannot make a live worker lose its leases (a long job
is never re-run while its worker lives). The same statement reports runs whose cancellation
was requested (a safety net for a lost ``qdworker_cancel`` notification).

Watchdog: if the trio loop has not ticked for :data:`LOOP_STALL_SECONDS` and a run is past its
deadline by :data:`STUCK_GRACE_SECONDS`, a handler is blocking the loop and ignoring its
timeout. The thread then fails those runs (timed out, fenced), releases the worker's other
runs, and ends the process with :data:`EXIT_STUCK`; the supervisor starts a new one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import trio
from psycopg.rows import dict_row

from ..db import statements
from .runner import Run, error_result

__all__ = ["EXIT_STUCK", "LOOP_STALL_SECONDS", "STUCK_GRACE_SECONDS", "LeaseKeeper"]

logger = logging.getLogger(__name__)

EXIT_STUCK = 3
LOOP_STALL_SECONDS = 2.0
STUCK_GRACE_SECONDS = 3.0
CHECK_SECONDS = 0.5


class LeaseKeeper:
    """Owns a thread and its connection. ``runs()`` returns the current runs (any thread);
    ``on_cancel(job_id)`` is scheduled into the trio loop."""

    def __init__(
        self,
        url: str,
        owner: str,
        lease_seconds: float,
        runs: Callable[[], list[Run]],
        on_cancel: Callable[[int], None],
    ) -> None:
        self._url = url
        self._owner = owner
        self._lease = lease_seconds
        self._runs = runs
        self._on_cancel = on_cancel
        self._stop = threading.Event()
        self._token = trio.lowlevel.current_trio_token()
        self.loop_tick = time.monotonic()
        self.renewals = 0
        self._thread = threading.Thread(target=self._main, name="qdworker-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    async def tick(self) -> None:
        """Runs in the trio loop: proves it is alive."""
        while True:
            self.loop_tick = time.monotonic()
            await trio.sleep(CHECK_SECONDS / 2)

    def _main(self) -> None:
        conn: psycopg.Connection[dict[str, Any]] | None = None
        renew_every = self._lease / 3
        next_renew = time.monotonic() + renew_every
        while not self._stop.wait(CHECK_SECONDS):
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(
                        self._url,
                        autocommit=True,
                        row_factory=dict_row,
                        application_name="qdworker-leases",
                    )
                if time.monotonic() >= next_renew:
                    self._renew(conn)
                    next_renew = time.monotonic() + renew_every
                self._watch(conn)
            except psycopg.Error as exc:
                logger.warning("lease renewal failed (%s); retrying", exc)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _renew(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        rows = conn.execute(
            statements.get("renew_leases"), {"owner": self._owner, "lease_seconds": self._lease}
        ).fetchall()
        self.renewals += 1
        for row in rows:
            if row["cancel_requested"]:
                self._token.run_sync_soon(self._on_cancel, int(row["id"]))

    def _watch(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        now = time.monotonic()
        if now - self.loop_tick < LOOP_STALL_SECONDS:
            return
        runs = self._runs()
        stuck = [
            r for r in runs if r.deadline is not None and now > r.deadline + STUCK_GRACE_SECONDS
        ]
        if not stuck:
            return
        others = [r for r in runs if r not in stuck]
        for run in stuck:
            logger.error(
                "job %d (%s) ignores its timeout and blocks the worker: failing it and replacing "
                "this worker process",
                run.job.id,
                run.job.type,
                extra={"job_id": run.job.id, "job_type": run.job.type},
            )
        timeout = [
            json.dumps(
                error_result(
                    "timed out and ignored cancellation; the worker process was replaced",
                    "JobTimeout",
                )
            )
            for _ in stuck
        ]
        with conn.transaction():
            conn.execute(
                statements.get("complete"),
                {
                    "ids": [r.job.id for r in stuck],
                    "claims": [r.job.claims for r in stuck],
                    "success": [False for _ in stuck],
                    "results": timeout,
                },
            )
            if others:
                conn.execute(
                    statements.get("release"),
                    {
                        "ids": [r.job.id for r in others],
                        "claims": [r.job.claims for r in others],
                    },
                )
        os._exit(EXIT_STUCK)
