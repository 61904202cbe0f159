"""What the dashboard's handlers share: JSON answers, request parsing, database calls.

:func:`json_response` encodes datetimes (ISO 8601), decimals and other values of job rows.
:func:`filters_from` reads the jobs filters from a mapping (a query string or a JSON body)
and raises ``HTTPException`` 400 naming the first bad one. :func:`db` runs a store function
through the app's :class:`~qdworker._db.connection.Link`, bounded by
:data:`DB_TIMEOUT_SECONDS`; a database that fails or does not answer becomes 503 (the
message says why; it never holds the URL).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final, TypeVar

import trio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .._logs import module_logger
from ..errors import DatabaseError
from ._dash_store import STATES, Filters, Raw
from .app import HttpState

logger = module_logger(__name__)
T = TypeVar("T")

#: A dashboard request waits this long for the database at most.
DB_TIMEOUT_SECONDS: Final = 10.0
#: Longest text a filter accepts.
MAX_FILTER_CHARS: Final = 500
#: Largest JSON body an action accepts.
MAX_BODY_BYTES: Final = 16 * 1024


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return str(value)


class JsonAnswer(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_default, allow_nan=False).encode()


def json_response(content: Any, status_code: int = 200) -> Response:
    return JsonAnswer(content, status_code=status_code, headers={"cache-control": "no-store"})


async def db(state: HttpState, fn: Callable[[Raw], T]) -> T:
    """``fn(raw)`` on the app's connection; 503 when the database fails or is silent."""
    with trio.move_on_after(DB_TIMEOUT_SECONDS):
        try:
            return await state.link.run(fn)
        except DatabaseError as exc:
            logger.debug("dashboard: database: %s", exc)
            raise HTTPException(503, f"database: {exc}") from None
    raise HTTPException(503, f"database: no answer within {DB_TIMEOUT_SECONDS:g} s")


def _text(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_FILTER_CHARS:
        raise HTTPException(400, f"{key}: a text of at most {MAX_FILTER_CHARS} characters")
    return value


def integer(params: Mapping[str, Any], key: str, lowest: int = 0) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise HTTPException(400, f"{key}: not an integer") from None
    if not lowest <= number <= 2**63 - 1:
        raise HTTPException(400, f"{key}: out of range")
    return number


def _moment(params: Mapping[str, Any], key: str) -> datetime | None:
    value = _text(params, key)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(400, f"{key}: not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise HTTPException(400, f"{key}: give the time zone (e.g. 2026-01-31T12:00Z)")
    return moment


def filters_from(params: Mapping[str, Any]) -> Filters:
    """The filters in ``params`` (unknown keys are ignored); 400 for a bad value."""
    state = _text(params, "state")
    if state is not None and state not in STATES:
        raise HTTPException(400, f"state: one of {', '.join(STATES)}")
    return Filters(
        id=integer(params, "id", 1),
        state=state,
        type=_text(params, "type"),
        queue=_text(params, "queue"),
        user_id=integer(params, "user_id"),
        tag=_text(params, "tag"),
        concurrency_key=_text(params, "concurrency_key"),
        error_type=_text(params, "error_type"),
        error=_text(params, "error"),
        text=_text(params, "text"),
        since=_moment(params, "since"),
        until=_moment(params, "until"),
    )


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (400 otherwise; 413 over :data:`MAX_BODY_BYTES`)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"a body of at most {MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise HTTPException(400, "the body is not a JSON object")
    return value
