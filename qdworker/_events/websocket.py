"""QuickDapp-compatible websocket server for worker notifications and job events.

The protocol is documented in ``docs/websocket.md``.  In short: clients
connect to ``/ws``, receive ``{"type": "connected"}``, then register with
``{"type": "register", "jwtToken": "..."}`` (or authenticate with an
``Authorization: Bearer`` header during the handshake) and may narrow job
events with ``{"type": "subscribe", "data": {...}}``.

Resource behaviour:

* Every connection runs in its own handler task; each handler catches its own
  errors (only ``trio.Cancelled`` and other ``BaseException``\\ s escape), so
  one bad connection can never take the server down.
* Inbound messages are capped at ``max_message_bytes`` (measured by
  ``len()`` of the decoded text; the connection is closed with 1009) and at
  most :data:`INBOUND_QUEUE_MESSAGES` are buffered.
* Outbound traffic goes through the hub's bounded per-client queue; a client
  that falls behind by a full queue is closed with
  :data:`CLOSE_CLIENT_TOO_SLOW`.  If its socket is so stuck that even that
  cannot be sent within ``close_timeout``, the TCP connection is dropped.
* A ping is sent every ``ping_interval`` seconds; no pong within another
  ``ping_interval`` closes the connection with :data:`CLOSE_PING_TIMEOUT`.
* On shutdown (cancellation of :func:`serve`) each connection is sent a
  best-effort close frame with 1001 and its socket is closed within
  :data:`SHUTDOWN_CLOSE_TIMEOUT_SECONDS` (the close reply cannot be read
  because the connection's reader is cancelled too).

Errors: :func:`serve` raises :class:`ValueError` for an unusable secret and
lets binding errors (``OSError``) propagate before reporting its port; after
that it runs until cancelled.

This module is the server's public face (the settings, close and error codes,
:func:`serve`) and its admission of connections (path, connection limit); the
parts live in private modules: ``_handshake`` (origin, handshake,
authentication, per-user cap), ``_connection`` (one connection's reader,
writer, overflow watch and pinger), ``_batched_send`` (several messages in
one write), ``_messages`` (codes and message texts) and ``_subscription``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Final

import trio
from trio_websocket import Endpoint, WebSocketRequest, serve_websocket

from .._config import Config
from .._logs import module_logger
from .._net import is_loopback, normalize_host
from ._connection import ConnectionRunner
from ._handshake import Admission, Refused, total_limit_refusal
from .hub import Hub

logger = module_logger(__name__)

WS_PATH: Final = "/ws"

HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0
PING_INTERVAL_SECONDS: Final = 20.0
CLOSE_TIMEOUT_SECONDS: Final = 5.0
"""Bound on a close handshake (and on waiting for a stuck writer before it)."""
MAX_MESSAGE_BYTES: Final = 16 * 1024
INBOUND_QUEUE_MESSAGES: Final = 4
DEFAULT_MAX_TOTAL_CONNECTIONS: Final = 10000
DEFAULT_MAX_CONNECTIONS_PER_USER: Final = 5


@dataclass(frozen=True)
class ServerSettings:
    """How the websocket server listens and whom it admits (see :func:`serve`)."""

    host: str
    port: int
    secret: str | None
    origins: tuple[str, ...] = ()
    max_total_connections: int = DEFAULT_MAX_TOTAL_CONNECTIONS
    max_connections_per_user: int = DEFAULT_MAX_CONNECTIONS_PER_USER
    handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS
    ping_interval: float = PING_INTERVAL_SECONDS
    max_message_bytes: int = MAX_MESSAGE_BYTES
    close_timeout: float = CLOSE_TIMEOUT_SECONDS

    @classmethod
    def from_config(cls, config: Config) -> ServerSettings:
        """The settings ``QDWORKER_WS_*`` and ``SOCKET_MAX_*`` give."""
        return cls(
            host=config.ws_host,
            port=config.ws_port,
            secret=config.ws_secret,
            origins=config.ws_origins,
            max_total_connections=config.ws_max_total_connections,
            max_connections_per_user=config.ws_max_connections_per_user,
        )


class _Server:
    """Admits connections (path, origin, total limit, handshake identity) and runs them."""

    def __init__(self, hub: Hub, settings: ServerSettings) -> None:
        self.max_total = settings.max_total_connections
        self.admission = Admission(
            hub,
            secret=settings.secret,
            origins=settings.origins,
            max_connections_per_user=settings.max_connections_per_user,
            handshake_timeout=settings.handshake_timeout,
            close_timeout=settings.close_timeout,
        )
        self.runner = ConnectionRunner(
            hub,
            self.admission,
            ping_interval=settings.ping_interval,
            close_timeout=settings.close_timeout,
        )
        self.connections = 0
        self._ids = itertools.count(1)

    async def handle(self, request: WebSocketRequest) -> None:
        """trio-websocket handler: never lets an Exception escape."""
        conn_id = next(self._ids)
        try:
            await self._handle(conn_id, request)
        except Exception:
            logger.exception("websocket connection %d failed", conn_id)

    async def _handle(self, conn_id: int, request: WebSocketRequest) -> None:
        admission = self.admission
        if request.path.split("?", 1)[0] != WS_PATH:
            await request.reject(404, body=b"not found")
            return
        origin = admission.refused_origin(request)
        if origin is not None:
            logger.info(
                "websocket connection %d refused: origin %r not allowed", conn_id, origin[:100]
            )
            await request.reject(403, body=b"origin not allowed")
            return
        if self.connections >= self.max_total:
            logger.warning(
                "websocket connection %d refused: %d connections open", conn_id, self.connections
            )
            ws = await admission.accept(request)
            if ws is not None:
                await admission.refuse(ws, total_limit_refusal())
            return
        self.connections += 1
        try:
            ws = await admission.accept(request)
            if ws is None:
                return
            try:
                identity = admission.handshake_identity(request)
            except Refused as refused:
                await admission.refuse(ws, refused)
                return
            await self.runner.run(conn_id, ws, identity)
        finally:
            self.connections -= 1


async def serve(
    hub: Hub,
    settings: ServerSettings,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the websocket endpoint until cancelled.

    ``task_status.started(port)`` reports the bound port (useful with ``port=0``).
    ``secret=None`` is development mode: every client is an admin, which is only allowed on a
    loopback ``host`` (``ValueError`` otherwise). ``origins``, when non-empty, is an
    allowlist for the ``Origin`` header (requests without one, i.e. non-browser clients, are
    allowed). ``ping_interval <= 0`` disables pings. Binding errors (``OSError``) propagate
    before ``started`` is called.
    """
    if settings.secret is None:
        if not is_loopback(settings.host):
            raise ValueError(
                "a secret is required unless the websocket server binds a loopback address"
            )
        logger.warning("websocket server has no secret: development mode, every client is an admin")
    elif not settings.secret:
        raise ValueError("secret must be None (development) or non-empty")
    server = _Server(hub, settings)
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(
            partial(
                serve_websocket,
                server.handle,
                normalize_host(settings.host),
                settings.port,
                None,
                message_queue_size=INBOUND_QUEUE_MESSAGES,
                max_message_size=settings.max_message_bytes,
                connect_timeout=settings.handshake_timeout,
                disconnect_timeout=settings.close_timeout,
            )
        )
        endpoints = [e for e in ws_server.listeners if isinstance(e, Endpoint)]
        task_status.started(endpoints[0].port if endpoints else settings.port)
