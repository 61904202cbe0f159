"""Who may read the dashboard's data and who may act on jobs.

Tokens are the websocket server's HS256 tokens (:mod:`qdworker._events.tokens`), sent as
``Authorization: Bearer <token>``: the ``viewer`` role reads, the ``admin`` role also acts.
Without ``QDWORKER_WS_SECRET`` (development mode, allowed only on a loopback address) every
request is an admin's, provided its ``Host`` header names a loopback host too (so a web page
cannot reach the dashboard by pointing its own DNS name at 127.0.0.1).

Actions are protected against cross-site requests: they must be ``POST`` with a JSON body and
the :data:`ACTION_HEADER` header, which a browser sends cross-origin only after a CORS preflight
this server never approves, and an ``Origin`` header, when present, must be this server's own.

:func:`reader` and :func:`actor` return the :class:`~qdworker._events.tokens.Identity` or raise
Starlette's ``HTTPException`` (401 without a usable token, 403 for too little role or a
refused action); token texts are never logged nor echoed.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request

from .._events._handshake import DEV_IDENTITY
from .._events.tokens import Identity, verify
from .._net import is_loopback
from ..errors import TokenError

#: The header every action must carry (any value); see the module docstring.
ACTION_HEADER: Final = "x-qdworker-action"


def _host_name(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


def identify(request: Request, secret: str | None) -> Identity:
    """The caller's identity (see the module docstring); raises ``HTTPException`` 401."""
    if secret is None:
        if not is_loopback(_host_name(request.headers.get("host", ""))):
            raise HTTPException(403, "development mode answers only loopback host names")
        return DEV_IDENTITY
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
    try:
        return verify(secret, token.strip())
    except TokenError as exc:
        raise HTTPException(401, str(exc), {"WWW-Authenticate": "Bearer"}) from None


def reader(request: Request, secret: str | None) -> Identity:
    """An identity that may read the dashboard's data (``viewer`` or ``admin``)."""
    identity = identify(request, secret)
    if not identity.viewer:
        raise HTTPException(403, "the dashboard needs a token with the viewer or admin role")
    return identity


def actor(request: Request, secret: str | None) -> Identity:
    """An identity that may act on jobs (``admin``), for a request that passed the
    cross-site checks; raises ``HTTPException`` 401 or 403."""
    _check_same_site(request)
    identity = identify(request, secret)
    if not identity.admin:
        raise HTTPException(403, "actions need a token with the admin role")
    return identity


def _check_same_site(request: Request) -> None:
    if request.method != "POST":
        raise HTTPException(405, "actions are POST requests")
    if ACTION_HEADER not in request.headers:
        raise HTTPException(403, f"actions need the {ACTION_HEADER} header")
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(415, "actions send application/json")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise HTTPException(403, "cross-site action refused")
