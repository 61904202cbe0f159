"""``GET /metrics``: Prometheus text format (``prometheus-client``, a registry of its own).

Two kinds of figures (README, section "Metrics", lists every name):

* **This supervisor's**: what its workers ran since it started (their heartbeat tallies,
  summed by :class:`~qdworker._supervisor._throughput.Throughput`: counters and histograms by
  queue and type), its worker slots, websocket clients, dropped events and database
  reconnects. Sum them over supervisors.
* **The cluster's**, read from Postgres (the same on every supervisor: take one, or ``max``):
  jobs enqueued (counted by the insert trigger, so plain-SQL inserts count), queue depth,
  running jobs, the oldest due job's age, live workers, cron lag. The first scrape reads them;
  later scrapes serve the figures read last and, when those are older than
  :data:`CLUSTER_MAX_AGE_SECONDS` (or :data:`READ_COST_FACTOR` times what the last read
  took), start a new read in the background (``HttpState.nursery``), so a scrape does not
  wait for Postgres however many jobs wait. A read gives up after
  :data:`CLUSTER_TIMEOUT_SECONDS`; ``qdworker_cluster_figures_age_seconds`` says how old the
  figures served are (none at all before the first answer). A scrape never fails because of
  the database.

Who may read: whoever may read the dashboard (:func:`.auth.reader`: a ``viewer`` or ``admin``
token, sent as ``Authorization: Bearer``, when ``QDWORKER_WS_SECRET`` is set).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .._db import _metrics as metrics_store
from .._logs import module_logger
from .._protocol import PICKUP_BOUNDS_MS, RUN_BOUNDS_MS
from ..errors import DatabaseError
from . import auth
from .app import HttpState

logger = module_logger(__name__)

#: Cluster figures are read from Postgres at most this often.
CLUSTER_MAX_AGE_SECONDS: Final = 2.0
#: ... and at most once per this many times the last read took (a read over a large backlog
#: costs a few hundred ms: then Postgres spends at most 1/20 of a backend on them).
READ_COST_FACTOR: Final = 20.0
#: A read of the cluster figures gives up after this long (the last figures are served).
CLUSTER_TIMEOUT_SECONDS: Final = 5.0

_JOB_LABELS: Final = ["queue", "type"]
#: Counters of the tally: (count name, metric name without ``_total``, help).
_COUNTERS: Final = (
    ("started", "qdworker_jobs_started", "Runs started by this supervisor's workers."),
    ("succeeded", "qdworker_jobs_succeeded", "Runs that succeeded."),
    ("failed", "qdworker_jobs_failed", "Runs that failed (the handler raised or was refused)."),
    ("timed_out", "qdworker_jobs_timed_out", "Runs stopped by their timeout."),
    ("cancelled", "qdworker_jobs_cancelled", "Runs cancelled by request."),
    ("retried", "qdworker_jobs_retried", "Failed runs that were given a retry."),
    ("lost", "qdworker_jobs_lost_runs", "Runs lost with their worker, rescued by these."),
)


class _Cluster:
    """The cluster figures, cached (see the module docstring)."""

    def __init__(self, state: HttpState) -> None:
        self._state = state
        self._lock = trio.Lock()
        self.figures: metrics_store.ClusterFigures | None = None
        self.read_at: float | None = None
        self._read_seconds = 0.0  # how long the last read took

    def _stale(self) -> bool:
        if self.read_at is None:
            return True
        max_age = max(CLUSTER_MAX_AGE_SECONDS, READ_COST_FACTOR * self._read_seconds)
        return trio.current_time() - self.read_at >= max_age

    async def refresh(self) -> None:
        """Make the figures fresh enough: the first read is awaited, later ones run in the
        background (the scrape serves the figures it has). Never raises (but cancellation)."""
        background = self._state.nursery
        if self.figures is None or background is None:
            await self._read()
        elif self._stale() and not self._lock.locked():
            background.start_soon(self._read)

    async def _read(self) -> None:
        async with self._lock:
            if not self._stale():
                return
            started = trio.current_time()
            with trio.move_on_after(CLUSTER_TIMEOUT_SECONDS):
                try:
                    self.figures = await self._state.link.run(metrics_store.cluster_figures)
                    self.read_at = trio.current_time()
                    self._read_seconds = self.read_at - started
                except DatabaseError as exc:
                    logger.debug("metrics: cluster figures unavailable: %s", exc)


def routes(state: HttpState) -> list[BaseRoute]:
    cluster = _Cluster(state)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(state, cluster))

    async def metrics(request: Request) -> Response:
        auth.reader(request, state.secret)  # raises HTTPException 401 / 403
        await cluster.refresh()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", metrics)]


class _Collector:
    """Builds every family from the supervisor's totals and the cached cluster figures."""

    def __init__(self, state: HttpState, cluster: _Cluster) -> None:
        self._state = state
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        totals = self._state.supervisor.tally_totals()
        yield from _tally_families(totals)
        yield from self._supervisor_families()
        figures = self._cluster.figures
        if figures is not None and self._cluster.read_at is not None:
            age = trio.current_time() - self._cluster.read_at
            yield _gauge("qdworker_cluster_figures_age_seconds",
                         "How old the cluster figures (read from Postgres) are.", age)  # fmt: skip
            yield from _cluster_families(figures)

    def _supervisor_families(self) -> Iterator[Metric]:
        slots = self._state.supervisor.worker_slots()
        service = self._state.supervisor.service_figures()
        yield _gauge("qdworker_workers_alive", "This supervisor's live worker processes.",
                     sum(1 for s in slots if s.alive))  # fmt: skip
        yield _counter("qdworker_worker_restarts", "Worker processes this supervisor restarted.",
                       sum(s.restarts for s in slots))  # fmt: skip
        yield _gauge("qdworker_websocket_clients", "Websocket clients of this supervisor.",
                     service["websocket_clients"])  # fmt: skip
        yield _counter("qdworker_events_dropped", "Events dropped for slow websocket clients.",
                       service["events_dropped"])  # fmt: skip
        yield _counter("qdworker_database_reconnects",
                       "Database connections of the supervisor that replaced a broken one.",
                       service["database_reconnects"])  # fmt: skip


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _tally_families(totals: Mapping[tuple[str, str], Mapping[str, Any]]) -> Iterator[Metric]:
    for count, name, documentation in _COUNTERS:
        family = CounterMetricFamily(name, documentation, labels=_JOB_LABELS)
        for (queue, job_type), total in sorted(totals.items()):
            family.add_metric([queue, job_type], total[count])
        yield family
    yield _histogram("qdworker_job_run_seconds", "How long handlers ran.", totals,
                     "run_hist", "run_ms", RUN_BOUNDS_MS)  # fmt: skip
    yield _histogram("qdworker_job_pickup_seconds", "How late runs started (started - due).",
                     totals, "pickup_hist", "pickup_ms", PICKUP_BOUNDS_MS)  # fmt: skip


def _histogram(
    name: str,
    documentation: str,
    totals: Mapping[tuple[str, str], Mapping[str, Any]],
    hist: str,
    sum_ms: str,
    bounds_ms: Iterable[int],
) -> HistogramMetricFamily:
    """A histogram from per-entry counts (one per bound, then the overflow)."""
    les = [f"{bound / 1000:g}" for bound in bounds_ms] + ["+Inf"]
    family = HistogramMetricFamily(name, documentation, labels=_JOB_LABELS)
    for (queue, job_type), total in sorted(totals.items()):
        cumulative, buckets = 0, []
        for le, count in zip(les, total[hist], strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        family.add_metric([queue, job_type], buckets, sum_value=total[sum_ms] / 1000)
    return family


def _cluster_families(figures: metrics_store.ClusterFigures) -> Iterator[Metric]:
    enqueued = CounterMetricFamily("qdworker_jobs_enqueued",
                                   "Jobs inserted (any way, plain SQL too), cluster-wide.",
                                   labels=_JOB_LABELS)  # fmt: skip
    for row in figures.enqueued:
        enqueued.add_metric([row["queue"], row["type"]], row["jobs"])
    yield enqueued
    yield from _queue_families(figures.queues)
    alive = sum(1 for w in figures.workers if w["alive"])
    yield _gauge("qdworker_cluster_workers_alive", "Live worker processes, cluster-wide.", alive)
    lag = GaugeMetricFamily("qdworker_cron_lag_seconds",
                            "How late each cron schedule's last tick started (or is so far).",
                            labels=["type", "tag"])  # fmt: skip
    for row in figures.cron:
        if row["lag_seconds"] is not None:
            lag.add_metric([row["type"], row["tag"]], max(0.0, row["lag_seconds"]))
    yield lag


def _queue_families(queues: list[dict[str, Any]]) -> Iterator[Metric]:
    for column, name, documentation in (
        ("due", "qdworker_queue_due_jobs", "Pending jobs due now, by queue."),
        ("scheduled", "qdworker_queue_scheduled_jobs", "Pending jobs due later, by queue."),
        ("running", "qdworker_queue_running_jobs", "Running jobs, by queue."),
        ("oldest_due_seconds", "qdworker_queue_oldest_due_age_seconds",
         "Age of the oldest due pending job, by queue (0: none)."),
    ):  # fmt: skip
        family = GaugeMetricFamily(name, documentation, labels=["queue"])
        for row in queues:
            family.add_metric([row["queue"]], row[column] or 0)
        yield family
