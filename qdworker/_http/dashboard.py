"""The live web dashboard: the page at ``GET /`` and its JSON API under ``/api/``.

The page (``static/``: plain HTML, CSS and JavaScript, no build step) reads the API with the
token the user gives it (kept in ``sessionStorage``, sent as ``Authorization: Bearer``) and
fetches its view again when ``GET /api/live`` (:mod:`._live`) says something changed.

Reads need :func:`.auth.reader` (viewer or admin); actions (:mod:`._dash_actions`) need
:func:`.auth.actor`. Every read is one statement of ``sql/queries/dashboard.sql`` through the
app's connection (:func:`._dash_web.db`: 503 when the database fails). The jobs list pages by
keyset (``before``: the last id of the previous page), newest first, so a deep page costs what
the first does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .._protocol import PICKUP_BOUNDS_MS
from . import _dash_actions, _dash_store
from ._dash_web import db, filters_from, integer, json_response
from ._live import LiveFeed
from .app import HttpState
from .auth import reader

#: The page's files.
STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
#: Jobs per page: the default and the most a request may ask for.
PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500
#: How far back the overview's throughput and pickup latency look.
OVERVIEW_WINDOW: Final = timedelta(hours=1)
#: Worker processes seen within this many hours are listed.
WORKER_HOURS: Final = 24
#: Most failure groups and cron jobs listed.
MAX_GROUPS: Final = 200


def percentile(hist: list[int], fraction: float) -> float | None:
    """The upper bound (ms) of the histogram entry holding the ``fraction`` quantile of
    ``hist`` (entries as :data:`PICKUP_BOUNDS_MS` plus overflow); ``None`` when empty, and
    ``inf`` when it falls in the overflow entry."""
    total = sum(hist)
    if total == 0:
        return None
    rank = fraction * total
    running = 0
    for i, n in enumerate(hist):
        running += n
        if running >= rank:
            return float(PICKUP_BOUNDS_MS[i]) if i < len(PICKUP_BOUNDS_MS) else float("inf")
    return float("inf")


def _pickup(rows: list[dict[str, Any]]) -> dict[str, Any]:
    hist = [0] * (len(PICKUP_BOUNDS_MS) + 1)
    for row in rows:
        if 1 <= row["entry"] <= len(hist):
            hist[row["entry"] - 1] += int(row["n"])
    shown = {"p50_ms": percentile(hist, 0.5), "p95_ms": percentile(hist, 0.95)}
    return {
        **{k: (None if v == float("inf") else v) for k, v in shown.items()},
        "over_last_bound": [k for k, v in shown.items() if v == float("inf")],
        "bounds_ms": list(PICKUP_BOUNDS_MS),
        "counts": hist,
    }


def routes(state: HttpState) -> list[BaseRoute]:
    feed = LiveFeed(state.url, state.options)
    state.background.append(feed.run)
    api = _Reads(state, feed)
    return [
        Route("/", api.page),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        Route("/api/me", api.me),
        Route("/api/live", api.live),
        Route("/api/overview", api.overview),
        Route("/api/jobs", api.jobs),
        Route("/api/jobs/count", api.count),
        Route("/api/jobs/{id:int}", api.job),
        Route("/api/failures", api.listing("dash_failures", limit=MAX_GROUPS)),
        Route("/api/cron", api.listing("dash_cron", limit=MAX_GROUPS)),
        Route("/api/queues", api.listing("list_queues")),
        Route("/api/workers", api.workers),
        *_dash_actions.routes(state),
    ]


class _Reads:
    """The page and the read handlers (each checks :func:`.auth.reader` first)."""

    def __init__(self, state: HttpState, feed: LiveFeed) -> None:
        self.state = state
        self.feed = feed

    def _read(self, request: Request) -> None:
        reader(request, self.state.secret)

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def me(self, request: Request) -> Response:
        identity = reader(request, self.state.secret)
        development = self.state.secret is None
        who = {"user_id": identity.user_id, "admin": identity.admin, "viewer": identity.viewer}
        return json_response({**who, "development": development})

    async def live(self, request: Request) -> Response:
        self._read(request)
        if not self.feed.admit():
            raise HTTPException(503, "too many live dashboards; try again later")
        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        stream = self.feed.stream()
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    async def overview(self, request: Request) -> Response:
        self._read(request)
        since = datetime.now(UTC) - OVERVIEW_WINDOW

        def load(raw: _dash_store.Raw) -> dict[str, Any]:
            return {
                "since": since,
                "throughput": _dash_store.named(raw, "dash_throughput", since=since),
                "pickup": _pickup(_dash_store.named(raw, "dash_pickup", since=since)),
                "queues": _dash_store.named(raw, "list_queues"),
                "supervisors": _dash_store.named(raw, "dash_supervisors"),
                "workers": _dash_store.named(raw, "dash_workers", hours=WORKER_HOURS),
            }

        return json_response(await db(self.state, load))

    async def jobs(self, request: Request) -> Response:
        self._read(request)
        params = request.query_params
        filters = filters_from(params)
        before = integer(params, "before", 1)
        size = min(integer(params, "size", 1) or PAGE_SIZE, MAX_PAGE_SIZE)
        rows = await db(self.state, lambda raw: _dash_store.jobs_page(raw, filters, before, size))
        more = len(rows) > size
        rows = rows[:size]
        return json_response({"jobs": rows, "next": rows[-1]["id"] if more else None})

    async def count(self, request: Request) -> Response:
        self._read(request)
        filters = filters_from(request.query_params)
        n = await db(self.state, lambda raw: _dash_store.count(raw, filters))
        limit = _dash_store.BULK_LIMIT
        return json_response({"count": min(n, limit), "more": n > limit, "limit": limit})

    async def job(self, request: Request) -> Response:
        self._read(request)
        job_id = integer(request.path_params, "id", 1)
        assert job_id is not None

        def load(raw: _dash_store.Raw) -> dict[str, Any] | None:
            row = _dash_store.job(raw, job_id)
            return None if row is None else {"job": row, "chain": _dash_store.chain(raw, job_id)}

        found = await db(self.state, load)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return json_response(found)

    def listing(self, name: str, **params: Any) -> Callable[[Request], Awaitable[Response]]:
        """A handler answering ``{"rows": [...]}`` of the statement ``name``."""

        async def handler(request: Request) -> Response:
            self._read(request)
            rows = await db(self.state, lambda raw: _dash_store.named(raw, name, **params))
            return json_response({"rows": rows})

        return handler

    async def workers(self, request: Request) -> Response:
        self._read(request)

        def load(raw: _dash_store.Raw) -> dict[str, Any]:
            return {
                "supervisors": _dash_store.named(raw, "dash_supervisors"),
                "workers": _dash_store.named(raw, "dash_workers", hours=WORKER_HOURS),
            }

        return json_response(await db(self.state, load))
