"""The supervisor: database, migrations, built-in jobs, websocket server, worker children.

Embed it in a trio app (QuickDapp's ``WorkerManager`` interface)::

    async with trio.open_nursery() as nursery:
        manager = await nursery.start(qdworker.serve, config)
        await manager.submit_job(type="sendEmail", data={...})
        ...
        await manager.shutdown()

or run it with ``python -m qdworker`` (:mod:`qdworker._cli` adds the signal handling).

Start-up order (each step's error propagates from ``nursery.start`` and undoes the earlier
ones): websocket settings are checked (:class:`~qdworker.errors.ConfigError`); the database is
resolved (``DATABASE_URL``, or the embedded Postgres in ``data_dir``, started in a thread and
stopped on exit if this process started it) and waited for, at most ``startup_timeout``
seconds (:class:`~qdworker.errors.DatabaseUnavailableError` naming the cause; at once for a
wrong password or a missing database); migrations are applied (unless ``migrate`` is false);
built-in cron jobs are ensured; the relay to other supervisors, the maintenance round and the
websocket server (if ``ws_enabled``) and the HTTP surface (if ``http_enabled``) start;
``worker_count`` children start; then
``task_status.started(manager)``.

Once running, the supervisor and its workers ride out database outages: they reconnect on
their own, and the outage is logged once when it starts and once when it ends.

Shutdown: :meth:`Manager.shutdown` (or :meth:`Manager.request_shutdown`) sends every child
SIGTERM and waits for them (each gets ``shutdown_timeout`` + a margin before SIGKILL);
``immediate=True`` (a second signal) sends SIGUSR1 (cancel jobs now) and SIGKILLs after a
short grace. Then the services stop, the connections close and the embedded server is
stopped. Cancelling :func:`serve` instead terminates the children the same way (shielded)
before it returns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import trio

from .. import _devdb as devdb
from .._client import Queue
from .._config import Config
from .._db import migrate
from .._db.connect import OUTAGE, DbOptions
from .._db.connection import connect, wait_until_reachable
from .._events import websocket
from .._events._hub_statistics import HubStatistics
from .._events.hub import Hub
from .._events.relay import Relay, RelayStatistics
from .._http import app as http_app
from .._http import server as http_server
from .._logs import module_logger
from .._model import Job
from .._net import is_loopback
from .._redact import redact
from ..errors import ConfigError, EmbeddedDatabaseError
from . import children as children_module
from ._throughput import Throughput
from .children import Child, ChildStatistics
from .maintenance import run_maintenance
from .process import Interest, MessageHandler
from .startup import ensure_startup_jobs, load_job_modules

logger = module_logger(__name__)

#: Interval of the one-line health summary (debug level).
HEALTH_LOG_INTERVAL_SECONDS: Final = 30.0


@dataclass(frozen=True)
class SupervisorStatistics:
    """A snapshot of the supervisor: its database (password hidden), websocket port, children,
    the events hub and the relay to other supervisors."""

    database: str
    ws_port: int | None
    stopping: bool
    workers: tuple[ChildStatistics, ...]
    hub: HubStatistics
    relay: RelayStatistics


class Manager:
    """Handle of a running supervisor (QuickDapp's ``WorkerManager``): submit jobs, count
    workers, read statistics, shut down. Built by :func:`serve`; do not construct it."""

    def __init__(
        self,
        config: Config,
        url: str,
        children: Sequence[Child],
        hub: Hub,
        relay: Relay,
        stopped: trio.Event | None = None,
        throughput: Throughput | None = None,
    ) -> None:
        self.config = config
        #: What this supervisor's workers ran (``/metrics``, ``qdworker_throughput``).
        self.throughput = throughput or Throughput(children_module.worker_id_prefix())
        #: The database URL (may contain a password: redact it before logging).
        self.url = url
        #: The websocket server's bound port, or ``None`` when it is disabled.
        self.ws_port: int | None = None
        #: The HTTP server's bound port (dashboard, metrics, probes), or ``None``.
        self.http_port: int | None = None
        #: The events hub: routes worker events to this supervisor's websocket clients.
        self.hub = hub
        #: Events to and from other supervisors on the same database.
        self.relay = relay
        self._children = tuple(children)
        self._queue: Queue | None = None
        self._queue_lock = trio.Lock()
        self._shutdown_requested = trio.Event()
        self._immediate = False
        self._stopped = stopped if stopped is not None else trio.Event()

    async def submit_job(self, **fields: Any) -> Job:
        """Insert a job (see :meth:`qdworker.Queue.submit_job`); returns it as stored. Uses one
        connection of its own, opened on first use and closed when the supervisor stops."""
        async with self._queue_lock:
            if self._queue is None:
                self._queue = await Queue(self.url, db_timeout=self.config.db_timeout).open()
        return await self._queue.submit_job(**fields)

    def get_worker_count(self) -> int:
        """The number of worker processes this supervisor keeps running."""
        return len(self._children)

    def request_shutdown(self, *, immediate: bool = False) -> None:
        """Start a graceful shutdown without waiting; ``immediate=True`` (also after a graceful
        request) cancels the children's running jobs at once. Idempotent."""
        self._shutdown_requested.set()
        if immediate:
            self._immediate = True
            for child in self._children:
                child.hurry()
        else:
            for child in self._children:
                child.request_stop()

    async def shutdown(self, *, immediate: bool = False) -> None:
        """Shut down (see :meth:`request_shutdown`) and wait until :func:`serve` has cleaned
        up everything (children exited, services stopped, database released)."""
        self.request_shutdown(immediate=immediate)
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Wait until the supervisor has stopped."""
        await self._stopped.wait()

    def worker_slots(self) -> tuple[ChildStatistics, ...]:
        """A snapshot of each worker slot (the HTTP surface's view of this supervisor)."""
        return tuple(child.statistics() for child in self._children)

    def tally_totals(self) -> dict[tuple[str, str], dict[str, Any]]:
        """What this supervisor's workers ran since it started, by (queue, type)."""
        return self.throughput.totals()

    def service_figures(self) -> dict[str, int]:
        """Websocket clients, events dropped for slow clients, database reconnects."""
        hub = self.hub.statistics()
        return {"websocket_clients": hub.clients, "events_dropped": hub.dropped_clients,
                "database_reconnects": OUTAGE.reconnects}  # fmt: skip

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(
            database=redact(self.url),
            ws_port=self.ws_port,
            stopping=self._shutdown_requested.is_set(),
            workers=self.worker_slots(),
            hub=self.hub.statistics(),
            relay=self.relay.statistics(),
        )

    async def _close(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            await queue.aclose()


def check_ws_settings(config: Config) -> None:
    """Refuse a websocket or HTTP server without a secret on a non-loopback address
    (:class:`ConfigError`): without ``QDWORKER_WS_SECRET`` every client is an admin."""
    if config.ws_secret is not None:
        return
    for enabled, name, host, off in (
        (config.ws_enabled, "QDWORKER_WS_HOST", config.ws_host, "QDWORKER_WS=false"),
        (config.http_enabled, "QDWORKER_HTTP_HOST", config.http_host, "QDWORKER_HTTP=false"),
    ):
        if enabled and not is_loopback(host):
            raise ConfigError(
                f"{name}={host!r} is not a loopback address: set QDWORKER_WS_SECRET (without "
                f"it every client is an admin), or bind 127.0.0.1, or set {off}"
            )


@contextlib.asynccontextmanager
async def embedded_database(config: Config) -> AsyncIterator[str]:
    """Yield the database URL: ``config.database_url``, or the embedded Postgres in
    ``config.data_dir`` (started or attached in a thread; on exit stopped if this process
    started it and nobody else uses it). Raises :class:`EmbeddedDatabaseError`."""
    if config.database_url:
        logger.info("database: %s", redact(config.database_url))
        yield config.database_url
        return
    try:
        server = await trio.to_thread.run_sync(devdb.start, config.data_dir)
    except EmbeddedDatabaseError:
        raise
    except OSError as exc:
        raise EmbeddedDatabaseError(
            f"cannot start the embedded Postgres in {config.data_dir}: {exc}"
        ) from exc
    try:
        logger.info(
            "embedded Postgres %s: %s",
            "started" if server.started_here else "attached",
            redact(server.url),
        )
        yield server.url
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(devdb.stop, server)


def _router(hub: Hub, relay: Relay, on_message: MessageHandler | None) -> MessageHandler:
    def route(worker_id: str, msg: Mapping[str, Any]) -> None:
        handled = hub.handle_ipc(worker_id, msg)
        if handled:
            relay.forward(msg)
        if on_message is not None:
            on_message(worker_id, msg)
        elif not handled:
            logger.debug("message from worker %s: %s", worker_id, msg.get("kind"))

    return route


async def _log_health(manager: Manager, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        if not logger.isEnabledFor(logging.DEBUG):
            continue
        now = trio.current_time()
        parts = []
        for s in manager.statistics().workers:
            age = f"{now - s.last_heartbeat:.1f}s" if s.last_heartbeat is not None else "-"
            parts.append(
                f"w{s.index}(pid={s.pid} {'up' if s.alive else 'down'} hb={age} "
                f"run={s.jobs_running} done={s.jobs_completed} fail={s.jobs_failed} "
                f"restarts={s.restarts})"
            )
        logger.debug("health: %s", " ".join(parts) or "no workers")


async def _serve_http(
    manager: Manager, options: DbOptions, *, task_status: trio.TaskStatus[int]
) -> None:
    """The HTTP surface (:mod:`qdworker._http`) until cancelled; ``started(bound_port)``."""
    state = http_app.HttpState(manager.config, manager.url, options, manager)
    try:
        app, config = http_app.build_app(state), manager.config
        await http_server.serve(app, config.http_host, config.http_port, task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await state.aclose()


async def serve(
    config: Config,
    *,
    on_message: MessageHandler | None = None,
    worker_argv: Sequence[str] | None = None,
    health_interval: float = HEALTH_LOG_INTERVAL_SECONDS,
    task_status: trio.TaskStatus[Manager] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the supervisor until :meth:`Manager.shutdown` (then return) or cancellation.

    ``on_message(worker_id, msg)`` also receives the workers' ``send-to-user``,
    ``broadcast`` and ``job-events`` messages (the hub gets them first when the websocket
    server runs). ``worker_argv`` replaces ``python -m qdworker._worker`` (tests). Errors during
    start-up (:class:`ConfigError`, :class:`EmbeddedDatabaseError`,
    :class:`~qdworker.errors.DatabaseError`, :class:`~qdworker.errors.MigrationError`,
    ``OSError`` binding the websocket port) propagate before ``started``.
    """
    check_ws_settings(config)
    modules = load_job_modules(config.jobs)
    stopped = trio.Event()
    try:
        async with embedded_database(config) as url:
            options = DbOptions(config.db_timeout)
            await _prepare_database(url, options, config, modules)
            manager = _assemble(config, url, options, on_message, worker_argv, stopped)
            try:
                await _run(manager, options, health_interval, task_status)
            finally:
                with trio.CancelScope(shield=True):
                    await manager._close()
    finally:
        stopped.set()


async def _prepare_database(
    url: str, options: DbOptions, config: Config, modules: Sequence[str]
) -> None:
    """Wait for the database, migrate it, ensure the job modules' start-up jobs."""
    await wait_until_reachable(url, options, config.startup_timeout)
    conn = await connect(url, "supervisor", options, statement_timeout=False)
    try:
        if config.migrate:
            applied = await migrate.apply(conn)
            if applied:
                logger.info("applied migrations %s", ", ".join(f"{v:04d}" for v in applied))
            else:
                logger.debug("schema is up to date")
        await ensure_startup_jobs(conn, modules, config.timezone)
    finally:
        await conn.aclose()


def _assemble(
    config: Config,
    url: str,
    options: DbOptions,
    on_message: MessageHandler | None,
    worker_argv: Sequence[str] | None,
    stopped: trio.Event,
) -> Manager:
    """The hub, the relay, the worker slots and the manager that holds them. The hub and relay
    exist even without a websocket server here: other supervisors' clients may want this
    one's events."""
    hub = Hub()
    supervisor_id = children_module.worker_id_prefix()
    relay = Relay(url, hub, supervisor_id, options=options)
    interest = Interest()

    def refresh_interest() -> None:
        interest.set(hub.client_count > 0 or relay.statistics().peers_with_clients > 0)

    hub.on_clients_changed = relay.on_peers_changed = refresh_interest
    route = _router(hub, relay, on_message)
    throughput = Throughput(supervisor_id)
    argv = children_module.DEFAULT_WORKER_ARGV if worker_argv is None else tuple(worker_argv)
    workers = [
        Child(config, index=i, database_url=url, on_message=route, argv=argv,
              id_prefix=supervisor_id, supervisor_id=supervisor_id, interest=interest,
              on_tally=throughput.add)
        for i in range(config.worker_count)
    ]  # fmt: skip
    return Manager(config, url, workers, hub, relay, stopped, throughput)


async def _run(
    manager: Manager,
    options: DbOptions,
    health_interval: float,
    task_status: trio.TaskStatus[Manager],
) -> None:
    """Run the services and the workers until a shutdown is requested."""
    config = manager.config
    async with trio.open_nursery() as services:
        await services.start(manager.relay.run)
        maintenance = partial(
            run_maintenance, manager.url, options, unknown_type_timeout=config.unknown_type_timeout
        )
        await services.start(maintenance)
        await services.start(partial(manager.throughput.run, manager.url, options))
        if config.ws_enabled:
            settings = websocket.ServerSettings.from_config(config)
            manager.ws_port = await services.start(websocket.serve, manager.hub, settings)
        if config.http_enabled:
            manager.http_port = await services.start(_serve_http, manager, options)
        async with trio.open_nursery() as nursery:
            for child in manager._children:
                await nursery.start(child.run)
            services.start_soon(_log_health, manager, health_interval)
            ws = f", websocket on {config.ws_host}:{manager.ws_port}" if manager.ws_port else ""
            if manager.http_port:
                ws += f", dashboard on http://{config.http_host}:{manager.http_port}/"
            logger.info("supervisor ready: %d worker(s)%s", len(manager._children), ws)
            task_status.started(manager)
            await manager._shutdown_requested.wait()
            budget = f" (running jobs get {config.shutdown_timeout:g} s)"
            logger.info("shutting down%s", " immediately" if manager._immediate else budget)
            for child in manager._children:
                child.request_stop()
        services.cancel_scope.cancel()
    logger.info("supervisor stopped")
