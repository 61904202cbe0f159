"""The Starlette app of the supervisor's HTTP surface, assembled from its route modules.

Each route module (``health``, ...) exposes ``routes(state)``; :func:`build_app` joins them.
:class:`HttpState` is what every handler may use: the settings, the database (a
:class:`~qdworker._db.connection.Link` of its own, opened on first use and closed by
:meth:`HttpState.aclose`) and the supervisor, seen through the narrow :class:`SupervisorView`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

    def service_figures(self) -> Mapping[str, int]:
        """``websocket_clients``, ``events_dropped``, ``database_reconnects``."""


@dataclass
class HttpState:
    """Everything a handler may use. ``secret`` is ``QDWORKER_WS_SECRET`` (``None``: the
    development mode of :mod:`.auth`)."""

    config: Config
    url: str
    options: DbOptions
    supervisor: SupervisorView
    link: Link = field(init=False)
    #: Where handlers may start work that outlives their request (cancelled when the server
    #: stops); ``None``: they do the work inline.
    background: trio.Nursery | None = None

    def __post_init__(self) -> None:
        self.link = Link(self.url, "http", self.options, persistent=False)

    @property
    def secret(self) -> str | None:
        return self.config.ws_secret

    async def aclose(self) -> None:
        await self.link.aclose()


def build_app(state: HttpState) -> Starlette:
    """The app with every route module's routes."""
    from . import health, metrics

    routes: list[BaseRoute] = [*health.routes(state), *metrics.routes(state)]
    return Starlette(routes=routes)
