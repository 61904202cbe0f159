"""What this supervisor's workers ran: the sum of their heartbeat tallies
(:mod:`qdworker._worker._tally`), kept twice.

* :meth:`Throughput.totals`: since the supervisor started, by (queue, type), for ``/metrics``
  (counters and histograms only grow; a worker restart loses nothing already reported).
* ``qdworker_throughput``: per 10-second bucket (:data:`BUCKET_SECONDS`, by the time the
  heartbeat arrived), flushed every :data:`FLUSH_SECONDS` by :meth:`Throughput.run` with one
  upsert statement (``add_throughput``) that adds to this supervisor's own rows only. There
  ``failed`` counts every run that finished without success (failed, timed out, cancelled).

Errors: malformed tally entries are ignored (logged at debug). A flush that fails keeps its
rows for the next one; one whose outcome is unknown (the connection broke during it) drops
them rather than risk counting them twice (logged). Memory is bounded: at most
:data:`MAX_PENDING_ROWS` bucket rows wait to be flushed (further ones are dropped and
counted), and the totals at most :data:`MAX_TOTAL_KEYS` (queue, type) pairs. Used from the
trio thread.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any, Final

import trio

from .._db import _metrics as metrics_store
from .._db.connect import DbOptions
from .._db.connection import Link
from .._logs import module_logger
from .._protocol import PICKUP_BOUNDS_MS, RUN_BOUNDS_MS, TALLY_COUNTS
from ..errors import DatabaseError, OutcomeUnknownError

logger = module_logger(__name__)

BUCKET_SECONDS: Final = 10
FLUSH_SECONDS: Final = 5.0
#: Bucket rows kept while the database is away (about 4 h of 10 busy (queue, type) pairs).
MAX_PENDING_ROWS: Final = 15_000
#: (queue, type) pairs kept in the totals; beyond them runs count under
#: (:data:`OVERFLOW_NAME`, :data:`OVERFLOW_NAME`).
MAX_TOTAL_KEYS: Final = 10_000
OVERFLOW_NAME: Final = "(other)"
#: Bound on the last flush at shutdown.
FINAL_FLUSH_SECONDS: Final = 3.0

_FAILED: Final = ("failed", "timed_out", "cancelled")


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(int(value), 0)


def _hist(value: Any, size: int) -> list[int]:
    items = value if isinstance(value, list) else []
    return [_count(items[i]) if i < len(items) else 0 for i in range(size)]


class _Bucket:
    __slots__ = ("failed", "pickup_hist", "run_ms", "started", "succeeded")

    def __init__(self) -> None:
        self.started = self.succeeded = self.failed = self.run_ms = 0
        self.pickup_hist = [0] * (len(PICKUP_BOUNDS_MS) + 1)


class Throughput:
    """The sums of one supervisor's tallies; see the module docstring."""

    def __init__(self, supervisor_id: str) -> None:
        self.supervisor_id = supervisor_id
        self._totals: dict[tuple[str, str], dict[str, Any]] = {}
        self._pending: dict[tuple[int, str, str], _Bucket] = {}
        self.dropped_rows = 0

    def add(self, tally: Any) -> None:
        """Add one heartbeat's ``tally`` (a list of entries; anything else is ignored)."""
        if not isinstance(tally, list):
            return
        bucket = int(time.time()) // BUCKET_SECONDS * BUCKET_SECONDS
        for entry in tally:
            if (
                isinstance(entry, Mapping)
                and isinstance(entry.get("queue"), str)
                and isinstance(entry.get("type"), str)
            ):
                self._add_entry(bucket, entry)
            else:
                logger.debug("ignoring a malformed tally entry: %.200r", entry)

    def _add_entry(self, bucket: int, entry: Mapping[str, Any]) -> None:
        key = (entry["queue"], entry["type"])
        counts = {name: _count(entry.get(name)) for name in TALLY_COUNTS}
        run_hist = _hist(entry.get("run_hist"), len(RUN_BOUNDS_MS) + 1)
        pickup_hist = _hist(entry.get("pickup_hist"), len(PICKUP_BOUNDS_MS) + 1)
        if key not in self._totals and len(self._totals) >= MAX_TOTAL_KEYS:
            key = (OVERFLOW_NAME, OVERFLOW_NAME)
        total = self._totals.get(key)
        if total is None:
            total = self._totals[key] = {
                **dict.fromkeys(TALLY_COUNTS, 0),
                "run_hist": [0] * len(run_hist),
                "pickup_hist": [0] * len(pickup_hist),
            }
        for name, value in counts.items():
            total[name] += value
        _add_into(total["run_hist"], run_hist)
        _add_into(total["pickup_hist"], pickup_hist)
        self._add_pending((bucket, *key), counts, pickup_hist)

    def _add_pending(
        self, key: tuple[int, str, str], counts: dict[str, int], pickup: list[int]
    ) -> None:
        row = self._pending.get(key)
        if row is None:
            if len(self._pending) >= MAX_PENDING_ROWS:
                self.dropped_rows += 1
                return
            row = self._pending[key] = _Bucket()
        row.started += counts["started"]
        row.succeeded += counts["succeeded"]
        row.failed += sum(counts[name] for name in _FAILED)
        row.run_ms += counts["run_ms"]
        _add_into(row.pickup_hist, pickup)

    def totals(self) -> dict[tuple[str, str], dict[str, Any]]:
        """A copy of the totals since start, by (queue, type): the :data:`TALLY_COUNTS`,
        ``run_hist`` and ``pickup_hist``."""
        return {key: {**t, "run_hist": list(t["run_hist"]), "pickup_hist": list(t["pickup_hist"])}
                for key, t in self._totals.items()}  # fmt: skip

    def _rows_json(self, pending: Mapping[tuple[int, str, str], _Bucket]) -> str:
        return json.dumps(
            [{"bucket": b, "queue": q, "type": t, "started": r.started, "succeeded": r.succeeded,
              "failed": r.failed, "run_ms": r.run_ms, "pickup": r.pickup_hist}
             for (b, q, t), r in pending.items()]
        )  # fmt: skip

    async def flush(self, link: Link) -> None:
        """Write the pending rows (one statement); see the module docstring for failures.
        Raises :class:`~qdworker.errors.DatabaseError` when they were kept for later."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        rows = self._rows_json(pending)
        try:
            await link.run(lambda raw: metrics_store.add_throughput(raw, self.supervisor_id, rows))
        except OutcomeUnknownError as exc:
            logger.warning("throughput of %d row(s) may be lost: %s", len(pending), exc)
        except DatabaseError:
            for key, row in pending.items():
                self._add_pending(key, _as_counts(row), row.pickup_hist)
            raise

    async def run(
        self,
        url: str,
        options: DbOptions,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Flush every :data:`FLUSH_SECONDS` until cancelled, then once more (bounded by
        :data:`FINAL_FLUSH_SECONDS`); never raises but cancellation."""
        link = Link(url, "metrics", options, persistent=False)
        task_status.started()
        try:
            while True:
                await trio.sleep(FLUSH_SECONDS)
                await self._flush_quietly(link)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_FLUSH_SECONDS):
                await self._flush_quietly(link)
            with trio.CancelScope(shield=True):
                await link.aclose()

    async def _flush_quietly(self, link: Link) -> None:
        try:
            await self.flush(link)
        except DatabaseError as exc:
            logger.debug("writing throughput failed (%s); retrying in %g s", exc, FLUSH_SECONDS)
        if self.dropped_rows:
            logger.warning("dropped %d throughput row(s): too many waiting", self.dropped_rows)
            self.dropped_rows = 0


def _add_into(into: list[int], values: list[int]) -> None:
    for i, value in enumerate(values[: len(into)]):
        into[i] += value


def _as_counts(row: _Bucket) -> dict[str, int]:
    """A pending row as counts again (its failures under ``failed``)."""
    return {**dict.fromkeys(TALLY_COUNTS, 0), "started": row.started, "succeeded": row.succeeded,
            "failed": row.failed, "run_ms": row.run_ms}  # fmt: skip
