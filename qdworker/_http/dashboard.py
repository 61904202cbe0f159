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
    feed = LiveFeed(state.url, state.options, state.supervisor)
    state.background.append(feed.run)

    def read(request: Request) -> None:
        reader(request, state.secret)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def me(request: Request) -> Response:
        identity = reader(request, state.secret)
        development = state.secret is None
        who = {"user_id": identity.user_id, "admin": identity.admin, "viewer": identity.viewer}
        return json_response({**who, "development": development})

    async def live(request: Request) -> Response:
        read(request)
        if not feed.admit():
            raise HTTPException(503, "too many live dashboards; try again later")
        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        return StreamingResponse(feed.stream(), media_type="text/event-stream", headers=headers)

    async def overview(request: Request) -> Response:
        read(request)
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

        return json_response(await db(state, load))

    async def jobs(request: Request) -> Response:
        read(request)
        params = request.query_params
        filters = filters_from(params)
        before = integer(params, "before", 1)
        size = min(integer(params, "size", 1) or PAGE_SIZE, MAX_PAGE_SIZE)
        rows = await db(state, lambda raw: _dash_store.jobs_page(raw, filters, before, size))
        more = len(rows) > size
        rows = rows[:size]
        return json_response({"jobs": rows, "next": rows[-1]["id"] if more else None})

    async def count(request: Request) -> Response:
        read(request)
        filters = filters_from(request.query_params)
        n = await db(state, lambda raw: _dash_store.count(raw, filters))
        limit = _dash_store.BULK_LIMIT
        return json_response({"count": min(n, limit), "more": n > limit, "limit": limit})

    async def job(request: Request) -> Response:
        read(request)
        job_id = integer(request.path_params, "id", 1)
        assert job_id is not None

        def load(raw: _dash_store.Raw) -> dict[str, Any] | None:
            row = _dash_store.job(raw, job_id)
            return None if row is None else {"job": row, "chain": _dash_store.chain(raw, job_id)}

        found = await db(state, load)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return json_response(found)

    def listing(name: str, **params: Any) -> Route:
        async def handler(request: Request) -> Response:
            read(request)
            rows = await db(state, lambda raw: _dash_store.named(raw, name, **params))
            return json_response({"rows": rows})

        return Route(f"/api/{name.removeprefix('dash_')}", handler)

    async def workers(request: Request) -> Response:
        read(request)

        def load(raw: _dash_store.Raw) -> dict[str, Any]:
            return {
                "supervisors": _dash_store.named(raw, "dash_supervisors"),
                "workers": _dash_store.named(raw, "dash_workers", hours=WORKER_HOURS),
            }

        return json_response(await db(state, load))

    return [
        Route("/", page),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        Route("/api/me", me),
        Route("/api/live", live),
        Route("/api/overview", overview),
        Route("/api/jobs", jobs),
        Route("/api/jobs/count", count),
        Route("/api/jobs/{id:int}", job),
        listing("dash_failures", limit=MAX_GROUPS),
        listing("dash_cron", limit=MAX_GROUPS),
        Route("/api/queues", _queues_handler(state)),
        Route("/api/workers", workers),
        *_dash_actions.routes(state),
    ]


def _queues_handler(state: HttpState) -> Any:
    async def queues(request: Request) -> Response:
        reader(request, state.secret)
        rows = await db(state, lambda raw: _dash_store.named(raw, "list_queues"))
        return json_response({"rows": rows})

    return queues
