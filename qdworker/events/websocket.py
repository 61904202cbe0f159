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
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from functools import partial
from typing import Any, Final

import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)
from wsproto.events import TextMessage

from qdworker._net import is_loopback, normalize_host
from qdworker.events.hub import MAX_SUBSCRIPTION_ITEMS, Hub, HubClient, Subscription
from qdworker.events.tokens import TOKEN_MALFORMED, Identity, TokenError, verify

__all__ = [
    "CLOSE_CLIENT_TOO_SLOW",
    "CLOSE_CONNECTION_LIMIT",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_PING_TIMEOUT",
    "CLOSE_TIMEOUT_SECONDS",
    "CLOSE_UNAUTHORIZED",
    "CONNECTION_LIMIT_PER_USER_EXCEEDED",
    "CONNECTION_LIMIT_TOTAL_EXCEEDED",
    "DEV_IDENTITY",
    "HANDSHAKE_TIMEOUT_SECONDS",
    "INBOUND_QUEUE_MESSAGES",
    "INVALID_MESSAGE",
    "MAX_MESSAGE_BYTES",
    "PING_INTERVAL_SECONDS",
    "SHUTDOWN_CLOSE_TIMEOUT_SECONDS",
    "WS_PATH",
    "serve",
]

logger = logging.getLogger(__name__)

WS_PATH: Final = "/ws"

HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0
PING_INTERVAL_SECONDS: Final = 20.0
CLOSE_TIMEOUT_SECONDS: Final = 5.0
"""Bound on a close handshake (and on waiting for a stuck writer before it)."""
SHUTDOWN_CLOSE_TIMEOUT_SECONDS: Final = 0.25
"""Bound on sending the 1001 close frame when the server is cancelled."""
MAX_MESSAGE_BYTES: Final = 16 * 1024
INBOUND_QUEUE_MESSAGES: Final = 4
SEND_BATCH_MESSAGES: Final = 1024  # per write: a client drains its queue as fast as events come
"""Texts taken from the hub queue per wake-up of a connection's writer."""

# Close codes (see docs/websocket.md).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_PING_TIMEOUT: Final = 4002
CLOSE_CLIENT_TOO_SLOW: Final = 4008
CLOSE_CONNECTION_LIMIT: Final = 4029

# Error codes carried in {"type": "error", "data": {"code": ...}}; token codes
# come from qdworker.events.tokens.
CONNECTION_LIMIT_TOTAL_EXCEEDED: Final = "CONNECTION_LIMIT_TOTAL_EXCEEDED"
CONNECTION_LIMIT_PER_USER_EXCEEDED: Final = "CONNECTION_LIMIT_PER_USER_EXCEEDED"
INVALID_MESSAGE: Final = "INVALID_MESSAGE"

DEV_IDENTITY: Final = Identity(user_id=0, admin=True)
"""Identity of every client when no secret is configured (development)."""

_SEPARATORS: Final = (",", ":")
_SUBSCRIPTION_KEYS: Final = frozenset({"jobTypes", "tags", "jobIds"})


def _text(msg_type: str, data: Any) -> str:
    return json.dumps({"type": msg_type, "data": data}, separators=_SEPARATORS)


def _error_text(code: str, message: str) -> str:
    return _text("error", {"code": code, "message": message})


_CONNECTED_TEXT: Final = _text("connected", {"message": "WebSocket connection established"})


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _bearer_token(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class _Refused(Exception):
    """Internal: the client's request is refused with an error + close."""

    def __init__(self, code: str, message: str, close_code: int, close_reason: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message
        self.close_code = close_code
        self.close_reason = close_reason


def _parse_subscription(data: Any) -> Subscription:
    """Validate the ``data`` of a subscribe message; ValueError if invalid."""
    if data is None:
        return Subscription()
    if not isinstance(data, dict):
        raise TypeError("subscribe data must be an object")
    unknown = set(data) - _SUBSCRIPTION_KEYS
    if unknown:
        raise ValueError(f"unknown subscribe fields: {sorted(unknown)}")

    def strings(key: str) -> frozenset[str] | None:
        value = data.get(key)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or len(value) > MAX_SUBSCRIPTION_ITEMS
            or not all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{key} must be a list of at most {MAX_SUBSCRIPTION_ITEMS} strings")
        return frozenset(value)

    ids = data.get("jobIds")
    job_ids: frozenset[int] | None = None
    if ids is not None:
        if (
            not isinstance(ids, list)
            or len(ids) > MAX_SUBSCRIPTION_ITEMS
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids)
        ):
            raise ValueError(f"jobIds must be a list of at most {MAX_SUBSCRIPTION_ITEMS} integers")
        job_ids = frozenset(ids)
    return Subscription(job_types=strings("jobTypes"), tags=strings("tags"), job_ids=job_ids)


def _subscription_data(sub: Subscription) -> dict[str, Any]:
    return {
        "jobTypes": None if sub.job_types is None else sorted(sub.job_types),
        "tags": None if sub.tags is None else sorted(sub.tags),
        "jobIds": None if sub.job_ids is None else sorted(sub.job_ids),
    }


class _Session:
    """State of one admitted connection while its tasks run."""

    def __init__(
        self, conn_id: int, ws: WebSocketConnection, client: HubClient, scope: trio.CancelScope
    ) -> None:
        self.conn_id = conn_id
        self.ws = ws
        self.client = client
        self.scope = scope
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.writer_done = trio.Event()

    def finish(self, code: int | None = None, reason: str | None = None) -> None:
        """End the session; the first decided close code wins."""
        if self.close_code is None and code is not None:
            self.close_code = code
            self.close_reason = reason
        self.scope.cancel()


class _Server:
    def __init__(
        self,
        hub: Hub,
        *,
        secret: str | None,
        origins: tuple[str, ...],
        max_total_connections: int,
        max_connections_per_user: int,
        handshake_timeout: float,
        ping_interval: float,
        close_timeout: float,
    ) -> None:
        self.hub = hub
        self.secret = secret
        self.origins = frozenset(o.lower().rstrip("/") for o in origins)
        self.max_total = max_total_connections
        self.max_per_user = max_connections_per_user
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.close_timeout = close_timeout
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
        if request.path.split("?", 1)[0] != WS_PATH:
            await request.reject(404, body=b"not found")
            return
        origin = _header(request, b"origin")
        if self.origins and origin is not None and origin.lower().rstrip("/") not in self.origins:
            logger.info(
                "websocket connection %d refused: origin %r not allowed", conn_id, origin[:100]
            )
            await request.reject(403, body=b"origin not allowed")
            return
        if self.connections >= self.max_total:
            logger.warning(
                "websocket connection %d refused: %d connections open", conn_id, self.connections
            )
            ws = await self._accept(request)
            if ws is not None:
                await self._refuse(
                    ws,
                    _Refused(
                        CONNECTION_LIMIT_TOTAL_EXCEEDED,
                        "Server connection limit exceeded. Please try again later.",
                        CLOSE_CONNECTION_LIMIT,
                        "connection limit",
                    ),
                )
            return
        self.connections += 1
        try:
            ws = await self._accept(request)
            if ws is None:
                return
            try:
                identity = self._handshake_identity(request)
            except _Refused as refused:
                await self._refuse(ws, refused)
                return
            await self._run_session(conn_id, ws, identity)
        finally:
            self.connections -= 1

    async def _accept(self, request: WebSocketRequest) -> WebSocketConnection | None:
        with trio.move_on_after(self.handshake_timeout):
            return await request.accept()
        return None

    async def _refuse(self, ws: WebSocketConnection, refused: _Refused) -> None:
        with trio.move_on_after(self.close_timeout):
            try:
                await ws.send_message(_error_text(refused.code, refused.message))
            except ConnectionClosed:
                return
            await ws.aclose(refused.close_code, refused.close_reason)

    def _handshake_identity(self, request: WebSocketRequest) -> Identity | None:
        if self.secret is None:
            return DEV_IDENTITY
        header = _header(request, b"authorization")
        if header is None:
            return None
        token = _bearer_token(header)
        if token is None:
            raise _Refused(
                TOKEN_MALFORMED,
                "Malformed Authorization header",
                CLOSE_UNAUTHORIZED,
                "unauthorized",
            )
        return self._verify(token, None)

    def _verify(self, token: str, current: Identity | None) -> Identity:
        """Verify a token and apply the per-user cap; raises _Refused."""
        assert self.secret is not None
        try:
            identity = verify(self.secret, token)
        except TokenError as exc:
            raise _Refused(exc.code, exc.message, CLOSE_UNAUTHORIZED, "unauthorized") from None
        others = self.hub.user_client_count(identity.user_id)
        if current is not None and current.user_id == identity.user_id:
            others -= 1
        if others >= self.max_per_user:
            logger.warning("per-user connection limit reached for user %d", identity.user_id)
            raise _Refused(
                CONNECTION_LIMIT_PER_USER_EXCEEDED,
                "Too many active connections for this user. "
                "Please close some connections and try again.",
                CLOSE_CONNECTION_LIMIT,
                "connection limit",
            )
        return identity

    def _registered_text(self, identity: Identity | None) -> str:
        if identity is None:
            return _text(
                "registered",
                {"userId": None, "admin": False, "message": "Registered without a user"},
            )
        user_id = None if self.secret is None else identity.user_id
        return _text(
            "registered",
            {
                "userId": user_id,
                "admin": identity.admin,
                "message": "Successfully registered with user ID",
            },
        )

    async def _run_session(
        self, conn_id: int, ws: WebSocketConnection, identity: Identity | None
    ) -> None:
        client = self.hub.add_client(identity)
        session: _Session | None = None
        try:
            await ws.send_message(_CONNECTED_TEXT)
            if identity is not None and self.secret is not None:
                await ws.send_message(self._registered_text(identity))
            async with trio.open_nursery() as nursery:
                session = _Session(conn_id, ws, client, nursery.cancel_scope)
                nursery.start_soon(self._reader, session)
                nursery.start_soon(self._writer, session)
                nursery.start_soon(self._overflow_watch, session)
                if self.ping_interval > 0:
                    nursery.start_soon(self._pinger, session)
        except ConnectionClosed:
            pass
        finally:
            self.hub.remove_client(client)
            reason: str | None
            if session is None or session.close_code is None:
                # Shutdown (or a failed start): this connection's reader task is
                # cancelled too, so the peer's close reply can never be read;
                # send our close frame and stop waiting soon.
                code, reason = CLOSE_GOING_AWAY, "server shutting down"
                timeout = min(self.close_timeout, SHUTDOWN_CLOSE_TIMEOUT_SECONDS)
            else:
                code, reason = session.close_code, session.close_reason
                timeout = self.close_timeout
            with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout):
                await ws.aclose(code, reason)
            logger.debug("websocket connection %d closed with %d", conn_id, code)

    # ------------------------------------------------------------------ tasks

    async def _reader(self, session: _Session) -> None:
        try:
            while True:
                message = await session.ws.get_message()
                await self._on_message(session, message)
        except ConnectionClosed:
            session.finish(CLOSE_NORMAL)
        except _Refused as refused:
            await self._send_quietly(session, _error_text(refused.code, refused.message))
            session.finish(refused.close_code, refused.close_reason)
        except Exception:
            logger.exception("websocket connection %d: reader failed", session.conn_id)
            session.finish(CLOSE_INTERNAL_ERROR, "internal error")

    async def _send_quietly(self, session: _Session, text: str) -> None:
        with trio.move_on_after(self.close_timeout):
            with contextlib.suppress(ConnectionClosed):
                await session.ws.send_message(text)

    async def _on_message(self, session: _Session, message: str | bytes) -> None:
        """Handle one client message; never logs its content (may hold a token)."""
        parsed: Any = None
        if isinstance(message, str):
            try:
                parsed = json.loads(message)
            except (ValueError, RecursionError):
                parsed = None
        msg_type = parsed.get("type") if isinstance(parsed, dict) else None
        if msg_type == "register":
            await self._register(session, parsed.get("jwtToken"))
        elif msg_type == "subscribe":
            try:
                subscription = _parse_subscription(parsed.get("data"))
            except (TypeError, ValueError) as exc:
                await session.ws.send_message(_error_text(INVALID_MESSAGE, str(exc)))
                return
            self.hub.set_subscription(session.client, subscription)
            await session.ws.send_message(_text("subscribed", _subscription_data(subscription)))
        else:
            await session.ws.send_message(
                _error_text(
                    INVALID_MESSAGE, "Expected a JSON object with type 'register' or 'subscribe'"
                )
            )

    async def _register(self, session: _Session, token: Any) -> None:
        client = session.client
        if self.secret is None:
            identity: Identity | None = DEV_IDENTITY
        elif token is None or token == "":
            identity = None
        elif not isinstance(token, str):
            raise _Refused(TOKEN_MALFORMED, "Malformed token", CLOSE_UNAUTHORIZED, "unauthorized")
        else:
            identity = self._verify(token, client.identity)
        if identity != client.identity:
            self.hub.set_identity(client, identity)
        await session.ws.send_message(self._registered_text(identity))

    async def _writer(self, session: _Session) -> None:
        try:
            while True:
                batch = await session.client.receive_batch(SEND_BATCH_MESSAGES)
                if not batch:
                    return
                await _send_many(session.ws, batch)
        except ConnectionClosed:
            session.finish(CLOSE_NORMAL)
        except Exception:
            logger.exception("websocket connection %d: writer failed", session.conn_id)
            session.finish(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            session.writer_done.set()

    async def _overflow_watch(self, session: _Session) -> None:
        await session.client.wait_overflowed()
        logger.info("websocket connection %d dropped: client too slow", session.conn_id)
        session.close_code = CLOSE_CLIENT_TOO_SLOW
        session.close_reason = "client too slow"
        # Let the writer finish the frame it is sending so the close frame is
        # not interleaved with a partial message; a stuck socket is cut off.
        with trio.move_on_after(self.close_timeout):
            await session.writer_done.wait()
        session.finish()

    async def _pinger(self, session: _Session) -> None:
        try:
            while True:
                await trio.sleep(self.ping_interval)
                with trio.move_on_after(self.ping_interval) as scope:
                    await session.ws.ping()
                if scope.cancelled_caught:
                    logger.info("websocket connection %d: no pong, closing", session.conn_id)
                    session.finish(CLOSE_PING_TIMEOUT, "ping timeout")
                    return
        except ConnectionClosed:
            session.finish(CLOSE_NORMAL)
        except Exception:
            logger.exception("websocket connection %d: pinger failed", session.conn_id)
            session.finish(CLOSE_INTERNAL_ERROR, "internal error")


async def _send_many(ws: WebSocketConnection, texts: list[str]) -> None:
    """Send ``texts`` as consecutive text messages in one write.

    One ``send_message`` per message is one write and one schedule point each: a client's
    writer would then send one message per scheduling round while a worker's frame of hundreds
    of events arrives in one, and even a fast client would fall behind. This encodes every
    frame first (trio-websocket 0.12's connection internals, as its own ``_send`` does) and
    falls back to one message at a time if those internals are not there.
    """
    proto = getattr(ws, "_wsproto", None)
    lock = getattr(ws, "_stream_lock", None)
    stream = getattr(ws, "_stream", None)
    if proto is None or lock is None or stream is None or len(texts) == 1:
        for text in texts:
            await ws.send_message(text)
        return
    if ws.closed is not None:
        raise ConnectionClosed(ws.closed)
    data = b"".join(proto.send(TextMessage(data=text)) for text in texts)
    async with lock:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws.closed) from None


async def serve(
    hub: Hub,
    *,
    host: str,
    port: int,
    secret: str | None,
    origins: tuple[str, ...] = (),
    max_total_connections: int = 10000,
    max_connections_per_user: int = 5,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
    ping_interval: float = PING_INTERVAL_SECONDS,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    close_timeout: float = CLOSE_TIMEOUT_SECONDS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the websocket endpoint until cancelled.

    ``task_status.started(port)`` reports the bound port (useful with
    ``port=0``).  ``secret=None`` is development mode: every client is an
    admin, which is only allowed on a loopback ``host`` (``ValueError``
    otherwise).  ``origins``, when non-empty, is an allowlist for the
    ``Origin`` header (requests without one, i.e. non-browser clients, are
    allowed).  ``ping_interval <= 0`` disables pings.  Binding errors
    (``OSError``) propagate before ``started`` is called.
    """
    if secret is None:
        if not is_loopback(host):
            raise ValueError(
                "a secret is required unless the websocket server binds a loopback address"
            )
        logger.warning("websocket server has no secret: development mode, every client is an admin")
    elif not secret:
        raise ValueError("secret must be None (development) or non-empty")
    server = _Server(
        hub,
        secret=secret,
        origins=origins,
        max_total_connections=max_total_connections,
        max_connections_per_user=max_connections_per_user,
        handshake_timeout=handshake_timeout,
        ping_interval=ping_interval,
        close_timeout=close_timeout,
    )
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(
            partial(
                serve_websocket,
                server.handle,
                normalize_host(host),
                port,
                None,
                message_queue_size=INBOUND_QUEUE_MESSAGES,
                max_message_size=max_message_bytes,
                connect_timeout=handshake_timeout,
                disconnect_timeout=close_timeout,
            )
        )
        endpoints = [e for e in ws_server.listeners if isinstance(e, Endpoint)]
        task_status.started(endpoints[0].port if endpoints else port)
