"""Admission of websocket connections: origin check, handshake, authentication, per-user cap.

:class:`Admission` holds one server's rules. During the HTTP upgrade it checks the ``Origin``
header against the allowlist (:meth:`Admission.refused_origin`), accepts the handshake within
the handshake timeout (:meth:`Admission.accept`) and authenticates an ``Authorization: Bearer``
header (:meth:`Admission.handshake_identity`); later ``register`` messages are authenticated by
:meth:`Admission.register_identity`. Both apply the per-user connection cap. Without a secret
(development mode) every client is :data:`DEV_IDENTITY`, an admin.

Errors: a refused client is signalled by raising :class:`Refused`, which carries the error
message and close code to send; :meth:`Admission.refuse` sends them, bounded by the close
timeout, and swallows ``ConnectionClosed``. Token text is never logged. Resources: none beyond
the connection being admitted, which the caller owns. Logs under
``qdworker._events.websocket``, the public module's name.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from ..errors import TokenError
from ._messages import (
    CLOSE_CONNECTION_LIMIT,
    CLOSE_UNAUTHORIZED,
    CONNECTION_LIMIT_PER_USER_EXCEEDED,
    CONNECTION_LIMIT_TOTAL_EXCEEDED,
    error_text,
    registered_text,
)
from .hub import Hub
from .tokens import TOKEN_MALFORMED, Identity, verify

logger = logging.getLogger("qdworker.events.websocket")

DEV_IDENTITY: Final = Identity(user_id=0, admin=True, viewer=True)
"""Identity of every client when no secret is configured (development)."""


class Refused(Exception):
    """The client's request is refused with an error message and a close code."""

    def __init__(self, code: str, message: str, close_code: int, close_reason: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message
        self.close_code = close_code
        self.close_reason = close_reason


def total_limit_refusal() -> Refused:
    """The refusal sent when the server has its maximum number of connections."""
    return Refused(
        CONNECTION_LIMIT_TOTAL_EXCEEDED,
        "Server connection limit exceeded. Please try again later.",
        CLOSE_CONNECTION_LIMIT,
        "connection limit",
    )


def _unauthorized(code: str, message: str) -> Refused:
    return Refused(code, message, CLOSE_UNAUTHORIZED, "unauthorized")


def header(request: WebSocketRequest, name: bytes) -> str | None:
    """The first request header called ``name`` (lower-case bytes), if any."""
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def bearer_token(value: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; ``None`` if malformed."""
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def _normalize_origin(origin: str) -> str:
    return origin.lower().rstrip("/")


class Admission:
    """One server's admission rules (see the module docstring)."""

    def __init__(
        self,
        hub: Hub,
        *,
        secret: str | None,
        origins: tuple[str, ...],
        max_connections_per_user: int,
        handshake_timeout: float,
        close_timeout: float,
    ) -> None:
        self.hub = hub
        self.secret = secret
        self.origins = frozenset(_normalize_origin(o) for o in origins)
        self.max_per_user = max_connections_per_user
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout

    @property
    def dev_mode(self) -> bool:
        """No secret: every client is :data:`DEV_IDENTITY`."""
        return self.secret is None

    def refused_origin(self, request: WebSocketRequest) -> str | None:
        """The request's ``Origin`` if an allowlist is set and it is not on it."""
        origin = header(request, b"origin")
        if self.origins and origin is not None and _normalize_origin(origin) not in self.origins:
            return origin
        return None

    async def accept(self, request: WebSocketRequest) -> WebSocketConnection | None:
        """Complete the handshake; ``None`` if it took longer than the handshake timeout."""
        with trio.move_on_after(self.handshake_timeout):
            return await request.accept()
        return None

    async def refuse(self, ws: WebSocketConnection, refused: Refused) -> None:
        """Send the refusal's error message, then close with its code (bounded in time)."""
        with trio.move_on_after(self.close_timeout):
            try:
                await ws.send_message(error_text(refused.code, refused.message))
            except ConnectionClosed:
                return
            await ws.aclose(refused.close_code, refused.close_reason)

    def handshake_identity(self, request: WebSocketRequest) -> Identity | None:
        """Who the handshake's ``Authorization`` header says; raises :class:`Refused`."""
        if self.secret is None:
            return DEV_IDENTITY
        value = header(request, b"authorization")
        if value is None:
            return None
        token = bearer_token(value)
        if token is None:
            raise _unauthorized(TOKEN_MALFORMED, "Malformed Authorization header")
        return self._verify(token, None)

    def register_identity(self, token: Any, current: Identity | None) -> Identity | None:
        """Who a ``register`` message's ``jwtToken`` says (empty: anonymous); raises
        :class:`Refused`. ``current`` is the connection's identity until now."""
        if self.secret is None:
            return DEV_IDENTITY
        if token is None or token == "":
            return None
        if not isinstance(token, str):
            raise _unauthorized(TOKEN_MALFORMED, "Malformed token")
        return self._verify(token, current)

    def registered_text(self, identity: Identity | None) -> str:
        """The ``registered`` reply for ``identity``."""
        return registered_text(identity, dev_mode=self.dev_mode)

    def _verify(self, token: str, current: Identity | None) -> Identity:
        """Verify a token and apply the per-user cap; raises :class:`Refused`."""
        assert self.secret is not None
        try:
            identity = verify(self.secret, token)
        except TokenError as exc:
            raise _unauthorized(exc.code, exc.message) from None
        others = self.hub.user_client_count(identity.user_id)
        if current is not None and current.user_id == identity.user_id:
            others -= 1
        if others >= self.max_per_user:
            logger.warning("per-user connection limit reached for user %d", identity.user_id)
            raise Refused(
                CONNECTION_LIMIT_PER_USER_EXCEEDED,
                "Too many active connections for this user. "
                "Please close some connections and try again.",
                CLOSE_CONNECTION_LIMIT,
                "connection limit",
            )
        return identity
