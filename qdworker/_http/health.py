"""Liveness and readiness probes (Kubernetes-style, no authentication).

``GET /healthz`` answers 200 while the supervisor's event loop runs. ``GET /readyz`` answers
200 when the database answers within :data:`READY_DB_TIMEOUT_SECONDS` and at least one of this
supervisor's workers is alive and sent a heartbeat within :data:`WORKER_STALE_SECONDS`
(a supervisor configured with no workers is ready when its database is); otherwise 503 with
``{"ready": false, "reasons": [...]}``.
"""

from __future__ import annotations

from typing import Final

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import DatabaseError
from .app import HttpState

#: The readiness probe's database check gives up after this long.
READY_DB_TIMEOUT_SECONDS: Final = 2.0
#: A worker silent for longer than this is not healthy (workers beat every second).
WORKER_STALE_SECONDS: Final = 5.0


def routes(state: HttpState) -> list[BaseRoute]:
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        reasons = [*await _database_reasons(state), *_worker_reasons(state)]
        if reasons:
            return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
        return JSONResponse({"ready": True})

    return [Route("/healthz", healthz), Route("/readyz", readyz)]


async def _database_reasons(state: HttpState) -> list[str]:
    with trio.move_on_after(READY_DB_TIMEOUT_SECONDS):
        try:
            await state.link.execute("SELECT 1", idempotent=True)
        except DatabaseError as exc:
            return [f"database: {exc}"]
        return []
    return [f"database: no answer within {READY_DB_TIMEOUT_SECONDS:g} s"]


def _worker_reasons(state: HttpState) -> list[str]:
    slots = state.supervisor.worker_slots()
    if not slots:
        return []
    now = trio.current_time()
    for slot in slots:
        beat = slot.last_heartbeat
        if slot.alive and beat is not None and now - beat <= WORKER_STALE_SECONDS:
            return []
    return [f"workers: none of {len(slots)} is alive with a heartbeat in the last "
            f"{WORKER_STALE_SECONDS:g} s"]  # fmt: skip
