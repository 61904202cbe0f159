"""Sending several websocket text messages in one write, through trio-websocket's internals.

trio-websocket's public API sends one message per ``send_message`` call: one socket write and
one schedule point each. A client's writer would then send one message per scheduling round
while a worker's IPC frame of hundreds of job events arrives in one, and even a fast client
would fall behind and be dropped. :func:`send_many` instead encodes every frame first and
writes them all at once, exactly as ``WebSocketConnection._send`` does for one frame: it uses
the connection's ``_wsproto`` (frame encoder), ``_stream_lock`` (serialises writers) and
``_stream`` (the transport), and ``_abort_web_socket`` when the transport breaks.

Those are private attributes of trio-websocket 0.12, so ``pyproject.toml`` pins
``trio-websocket>=0.12,<0.13`` and ``tests/events/test_websocket_internals.py`` fails, naming
what changed, if an upgrade removes or reshapes them (:data:`REQUIRED_INTERNALS`). Should they
be missing at run time anyway, :func:`send_many` falls back to one ``send_message`` per text
(correct, only slower).

Errors: like ``send_message``, :func:`send_many` raises
:class:`trio_websocket.ConnectionClosed` when the connection is closed or its transport is
broken (the connection is then aborted). Resources: the encoded batch, held until written.
"""

from __future__ import annotations

from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import TextMessage

REQUIRED_INTERNALS: Final = ("_wsproto", "_stream_lock", "_stream", "_abort_web_socket")
"""Private attributes of ``WebSocketConnection`` that :func:`send_many` uses."""


def has_internals(ws: WebSocketConnection) -> bool:
    """Whether ``ws`` has the internals needed for one-write batches."""
    return all(getattr(ws, name, None) is not None for name in REQUIRED_INTERNALS)


async def send_many(ws: WebSocketConnection, texts: list[str]) -> None:
    """Send ``texts`` as consecutive text messages in one write (see the module docstring)."""
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
