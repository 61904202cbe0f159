"""The Starlette app of the supervisor's HTTP surface, assembled from its route modules.

Each route module (``health``, ``dashboard``, ...) exposes ``routes(state)``; :func:`build_app`
joins them, and runs the tasks they put in :attr:`HttpState.background` for the app's life.
:class:`HttpState` is what every handler may use: the settings, the database (a
:class:`~qdworker._db.connection.Link` of its own, opened on first use and closed by
:meth:`HttpState.aclose`) and the supervisor, seen through the narrow :class:`SupervisorView`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from .._config import Config
from .._db.connect import DbOptions
from .._db.connection import Link


class WorkerView(Protocol):
    """One worker slot of this supervisor, as the HTTP surface reads it."""

    @property
    def index(self) -> int: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def alive(self) -> bool: ...
    @property
    def last_heartbeat(self) -> float | None: ...
    @property
    def restarts(self) -> int: ...


class SupervisorView(Protocol):
    """What the HTTP surface reads of the supervisor that serves it."""

    def worker_slots(self) -> Sequence[WorkerView]: ...
    def tally_totals(self) -> Mapping[tuple[str, str], Mapping[str, Any]]:
        """What its workers ran since it started, by (queue, type): the counts of
        ``qdworker._protocol.TALLY_COUNTS``, ``run_hist`` and ``pickup_hist``."""
        ...

    def service_figures(self) -> Mapping[str, int]:
        """``websocket_clients``, ``events_dropped``, ``database_reconnects``."""
        ...


@dataclass
class HttpState:
    """Everything a handler may use. ``secret`` is ``QDWORKER_WS_SECRET`` (``None``: the
    development mode of :mod:`.auth`)."""

    config: Config
    url: str
    options: DbOptions
    supervisor: SupervisorView
    link: Link = field(init=False)
    #: Tasks the route modules need while the app runs (e.g. the dashboard's live feed):
    #: started with the app, cancelled when it stops. Each must end only when cancelled.
    background: list[Callable[[], Awaitable[None]]] = field(init=False, default_factory=list)
    #: Where handlers may start work that outlives their request: the app's own nursery, the
    #: one the background tasks run in (cancelled when the server stops); ``None`` before the
    #: app starts: they do the work inline.
    nursery: trio.Nursery | None = None

    def __post_init__(self) -> None:
        self.link = Link(self.url, "http", self.options, persistent=False)

    @property
    def secret(self) -> str | None:
        return self.config.ws_secret

    async def aclose(self) -> None:
        await self.link.aclose()


def build_app(state: HttpState) -> Starlette:
    """The app with every route module's routes."""
    from . import dashboard, health, metrics

    routes: list[BaseRoute] = [
        *health.routes(state),
        *metrics.routes(state),
        *dashboard.routes(state),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            state.nursery = nursery
            for task in state.background:
                nursery.start_soon(task)
            yield
            nursery.cancel_scope.cancel()

    return Starlette(routes=routes, lifespan=lifespan)
