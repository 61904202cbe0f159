"""trio-websocket internals that qdworker/_events/_batched_send.py relies on.

``send_many`` writes a batch of text messages in one write through private attributes of
``WebSocketConnection`` (trio-websocket 0.12.x, pinned in pyproject.toml). These tests fail,
saying what changed, when an upgrade removes or reshapes them; the server would then fall back
to one write per message (correct but much slower for busy clients).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from qdworker._events._batched_send import REQUIRED_INTERNALS, has_internals, send_many

pytestmark = pytest.mark.trio

TIMEOUT = 10
ADVICE = (
    f"trio-websocket {version('trio-websocket')} changed the WebSocketConnection internals "
    "that qdworker/_events/_batched_send.py uses for one-write batches; adapt send_many to the "
    "new internals (or a public batch API) and the trio-websocket pin in pyproject.toml"
)


@asynccontextmanager
async def connection() -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection]]:
    """A real server-side connection over TCP and its client."""
    accepted: list[WebSocketConnection] = []
    ready = trio.Event()
    done = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        accepted.append(await request.accept())
        ready.set()
        await done.wait()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/ws") as client:
            with trio.fail_after(TIMEOUT):
                await ready.wait()
            yield accepted[0], client
            done.set()
        nursery.cancel_scope.cancel()


class _CountingStream:
    """Wraps a connection's transport and counts ``send_all`` calls."""

    def __init__(self, stream: Any) -> None:
        self._wrapped = stream
        self.writes = 0

    async def send_all(self, data: bytes) -> None:
        self.writes += 1
        await self._wrapped.send_all(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


def _shape_problems(ws: WebSocketConnection) -> list[str]:
    problems = [f"{name} is missing" for name in REQUIRED_INTERNALS if not hasattr(ws, name)]
    if problems:
        return problems
    proto, lock, stream = ws._wsproto, ws._stream_lock, ws._stream
    if not callable(getattr(proto, "send", None)):
        problems.append(f"_wsproto ({type(proto).__name__}) has no send(event) method")
    if not hasattr(type(lock), "__aenter__") or not hasattr(type(lock), "__aexit__"):
        problems.append(f"_stream_lock ({type(lock).__name__}) is not an async context manager")
    if not inspect.iscoroutinefunction(getattr(stream, "send_all", None)):
        problems.append(f"_stream ({type(stream).__name__}) has no async send_all(data)")
    abort = ws._abort_web_socket
    if not inspect.iscoroutinefunction(abort) or inspect.signature(abort).parameters:
        problems.append("_abort_web_socket is not an async method without arguments")
    if not hasattr(type(ws), "closed"):
        problems.append("the closed property is missing")
    return problems


async def test_internals_exist_with_expected_shape() -> None:
    async with connection() as (server_ws, _client):
        problems = _shape_problems(server_ws)
        assert not problems, f"{ADVICE}: {'; '.join(problems)}"
        assert has_internals(server_ws), ADVICE


async def test_batch_is_one_write_and_arrives_in_order() -> None:
    texts = [f'{{"n":{i}}}' for i in range(50)]
    async with connection() as (server_ws, client):
        counting = _CountingStream(server_ws._stream)
        server_ws._stream = counting  # type: ignore[assignment]
        await send_many(server_ws, texts)
        with trio.fail_after(TIMEOUT):
            received = [await client.get_message() for _ in texts]
        assert received == texts, f"{ADVICE}: batch arrived altered: {received[:3]}..."
        assert counting.writes == 1, (
            f"{ADVICE}: {len(texts)} messages took {counting.writes} writes instead of one"
        )


async def test_broken_transport_raises_connection_closed() -> None:
    async with connection() as (server_ws, _client):
        await server_ws._stream.aclose()
        with pytest.raises(ConnectionClosed) as info:
            await send_many(server_ws, ["a", "b"])
        assert info.value.reason is not None, f"{ADVICE}: no close reason after abort"
        assert server_ws.closed is not None, f"{ADVICE}: connection not marked closed"
