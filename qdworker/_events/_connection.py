"""One admitted websocket connection, from the ``connected`` greeting to its close frame.

:meth:`ConnectionRunner.run` registers the connection with the hub and runs four tasks until
the first of them ends the session: the *reader* (client messages: ``register``,
``subscribe``), the *writer* (the hub queue's texts, in batches of up to
:data:`SEND_BATCH_MESSAGES` sent in one write), the *overflow watch* (closes a client that fell
a full queue behind with :data:`CLOSE_CLIENT_TOO_SLOW`) and the *pinger* (closes a client that
does not answer a ping within ``ping_interval`` with :data:`CLOSE_PING_TIMEOUT`).

Errors: each task catches its own errors and turns them into a close code (``ConnectionClosed``
→ 1000, :class:`~._handshake.Refused` → its code after sending its error message, anything
else → 1011, logged); only ``trio.Cancelled`` and other ``BaseException``\\ s escape. Client
message contents are never logged (they may hold a token).

Resources: the connection's hub client, removed when :meth:`ConnectionRunner.run` returns, and
the connection itself, closed on the way out within ``close_timeout`` (on shutdown within
:data:`SHUTDOWN_CLOSE_TIMEOUT_SECONDS`, with 1001: the peer's reply cannot be read then because
this connection's reader is cancelled too). Logs under ``qdworker._events.websocket``, the
public module's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ._batched_send import send_many
from ._client_queue import HubClient
from ._handshake import Admission, Refused
from ._messages import (
    CLOSE_CLIENT_TOO_SLOW,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_PING_TIMEOUT,
    CONNECTED_TEXT,
    INVALID_MESSAGE,
    INVALID_MESSAGE_TEXT,
    error_text,
    text,
)
from ._subscription import parse_subscription, subscription_data
from .hub import Hub
from .tokens import Identity

logger = logging.getLogger("qdworker.events.websocket")

SHUTDOWN_CLOSE_TIMEOUT_SECONDS: Final = 0.25
"""Bound on sending the 1001 close frame when the server is cancelled."""
SEND_BATCH_MESSAGES: Final = 1024  # per write: a client drains its queue as fast as events come
"""Texts taken from the hub queue per wake-up of a connection's writer."""


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


class ConnectionRunner:
    """Runs admitted connections for one server (see the module docstring)."""

    def __init__(
        self, hub: Hub, admission: Admission, *, ping_interval: float, close_timeout: float
    ) -> None:
        self.hub = hub
        self.admission = admission
        self.ping_interval = ping_interval
        self.close_timeout = close_timeout

    async def run(self, conn_id: int, ws: WebSocketConnection, identity: Identity | None) -> None:
        """Serve an accepted connection as ``identity`` until it ends, then close it."""
        client = self.hub.add_client(identity)
        session: _Session | None = None
        try:
            await ws.send_message(CONNECTED_TEXT)
            if identity is not None and not self.admission.dev_mode:
                await ws.send_message(self.admission.registered_text(identity))
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
            await self._close(conn_id, ws, session)

    async def _close(self, conn_id: int, ws: WebSocketConnection, session: _Session | None) -> None:
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
        except Refused as refused:
            await self._send_quietly(session, error_text(refused.code, refused.message))
            session.finish(refused.close_code, refused.close_reason)
        except Exception:
            logger.exception("websocket connection %d: reader failed", session.conn_id)
            session.finish(CLOSE_INTERNAL_ERROR, "internal error")

    async def _send_quietly(self, session: _Session, message: str) -> None:
        with trio.move_on_after(self.close_timeout):
            with contextlib.suppress(ConnectionClosed):
                await session.ws.send_message(message)

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
            await self._subscribe(session, parsed.get("data"))
        else:
            await session.ws.send_message(INVALID_MESSAGE_TEXT)

    async def _register(self, session: _Session, token: Any) -> None:
        client = session.client
        identity = self.admission.register_identity(token, client.identity)
        if identity != client.identity:
            self.hub.set_identity(client, identity)
        await session.ws.send_message(self.admission.registered_text(identity))

    async def _subscribe(self, session: _Session, data: Any) -> None:
        try:
            subscription = parse_subscription(data)
        except (TypeError, ValueError) as exc:
            await session.ws.send_message(error_text(INVALID_MESSAGE, str(exc)))
            return
        self.hub.set_subscription(session.client, subscription)
        await session.ws.send_message(text("subscribed", subscription_data(subscription)))

    async def _writer(self, session: _Session) -> None:
        try:
            while True:
                batch = await session.client.receive_batch(SEND_BATCH_MESSAGES)
                if not batch:
                    return
                await send_many(session.ws, batch)
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
