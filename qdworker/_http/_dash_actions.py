"""The dashboard's actions (admin only, see :func:`.auth.actor`): each a ``POST`` of JSON.

* ``/api/actions/{cancel|retry|delete}`` with ``{"filters": {...}, "reason": "..."}``: the
  action on every job the filters match (the jobs list's filters; ``{"id": 42}`` for one job),
  at most :data:`~._dash_store.BULK_LIMIT` at once, in one transaction. Cancel takes the
  unfinished ones (``qdworker_cancel_job``), retry the dead ones (``qdworker_retry_job``),
  delete all but the running ones. Answers ``{"action", "touched", "results"}`` (``results``:
  the first :data:`MAX_RESULTS` rows).
* ``/api/queues/{name}/pause`` with ``{"paused": true|false}``.
* ``/api/cron/{id}/run``: the pending cron tick becomes due now (404 if it is not one).

Each action is logged (who, what, how many) at info level; never the token.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .._logs import module_logger
from .._queues import check_name
from ..errors import InvalidQueueError
from . import _dash_store
from ._dash_web import db, filters_from, integer, json_body, json_response
from .app import HttpState
from .auth import actor

logger = module_logger(__name__)

#: Rows of a bulk action's answer (the count is always complete).
MAX_RESULTS: Final = 100
#: Longest cancel reason kept (``qdworker_cancel_job`` keeps 500 characters).
MAX_REASON_CHARS: Final = 500
ACTIONS: Final = ("cancel", "retry", "delete")


def routes(state: HttpState) -> list[BaseRoute]:
    async def bulk(request: Request) -> Response:
        identity = actor(request, state.secret)
        action = str(request.path_params["action"])
        if action not in ACTIONS:
            raise HTTPException(404, f"no action {action!r}; one of {', '.join(ACTIONS)}")
        body = await json_body(request)
        raw_filters = body.get("filters", {})
        if not isinstance(raw_filters, dict):
            raise HTTPException(400, "filters: a JSON object")
        filters = filters_from(raw_filters)
        reason = body.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
            raise HTTPException(400, f"reason: a text of at most {MAX_REASON_CHARS} characters")
        reason = reason or f"cancelled from the dashboard by user {identity.user_id}"
        rows = await db(state, lambda raw: _dash_store.act(raw, action, filters, reason))
        logger.info("dashboard: user %s: %s of %d job(s)", identity.user_id, action, len(rows))
        answer = {"action": action, "touched": len(rows), "results": rows[:MAX_RESULTS]}
        return json_response(answer)

    async def pause(request: Request) -> Response:
        identity = actor(request, state.secret)
        try:
            name = check_name(request.path_params["name"])
        except InvalidQueueError as exc:
            raise HTTPException(400, str(exc)) from None
        paused = (await json_body(request)).get("paused")
        if not isinstance(paused, bool):
            raise HTTPException(400, "paused: true or false")
        row = await db(state, lambda raw: _dash_store.pause(raw, name, paused))
        logger.info("dashboard: user %s: queue %s paused=%s", identity.user_id, name, paused)
        return json_response({"queue": row})

    async def run_now(request: Request) -> Response:
        identity = actor(request, state.secret)
        job_id = integer(request.path_params, "id", 1)
        rows = await db(state, lambda raw: _dash_store.named(raw, "dash_run_now", id=job_id))
        if not rows:
            raise HTTPException(404, f"job {job_id} is not a pending cron tick")
        logger.info("dashboard: user %s: run cron job %s now", identity.user_id, job_id)
        return json_response({"id": job_id})

    def post(path: str, handler: Any) -> Route:
        return Route(path, handler, methods=["POST", "GET", "PUT", "DELETE", "PATCH"])

    return [
        post("/api/actions/{action}", bulk),
        post("/api/queues/{name}/pause", pause),
        post("/api/cron/{id:int}/run", run_now),
    ]
