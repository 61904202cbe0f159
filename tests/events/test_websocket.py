from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from qdworker._events._messages import (
    CLOSE_CLIENT_TOO_SLOW,
    CLOSE_CONNECTION_LIMIT,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_PING_TIMEOUT,
    CLOSE_UNAUTHORIZED,
)
from qdworker._events.hub import Hub, HubClient
from qdworker._events.tokens import mint
from qdworker._events.websocket import ServerSettings, serve

pytestmark = pytest.mark.trio

SECRET = "websocket-test-secret-0123456789abcdef"
TIMEOUT = 10


@asynccontextmanager
async def running(hub: Hub | None = None, **kwargs: Any) -> AsyncIterator[tuple[Hub, int]]:
    hub = hub if hub is not None else Hub()
    kwargs.setdefault("secret", SECRET)
    kwargs.setdefault("handshake_timeout", 5.0)
    kwargs.setdefault("ping_interval", 0)
    kwargs.setdefault("max_message_bytes", 4096)
    async with trio.open_nursery() as nursery:
        settings = ServerSettings(host="127.0.0.1", port=0, **kwargs)
        port = await nursery.start(serve, hub, settings)
        yield hub, port
        nursery.cancel_scope.cancel()


def url(port: int, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{port}{path}"


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {token}".encode())]


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        msg = json.loads(await ws.get_message())
    assert isinstance(msg, dict)
    return msg


async def closed_code(ws: WebSocketConnection) -> int:
    """Read until the connection closes; return the close code."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason.code


async def register(ws: WebSocketConnection, token: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "register"}
    if token is not None:
        body["jwtToken"] = token
    await ws.send_message(json.dumps(body))
    return await recv(ws)


async def test_connected_then_register_valid_token() -> None:
    async with running() as (hub, port), open_websocket_url(url(port)) as ws:
        connected = await recv(ws)
        assert connected == {
            "type": "connected",
            "data": {"message": "WebSocket connection established"},
        }
        reply = await register(ws, mint(SECRET, 7, 60))
        assert reply["type"] == "registered"
        assert reply["data"]["userId"] == 7
        assert reply["data"]["admin"] is False
        assert hub.user_client_count(7) == 1


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (mint("some-other-secret-0123456789abcdefgh", 7, 60), "TOKEN_INVALID"),
        (mint(SECRET, 7, -60), "TOKEN_EXPIRED"),
        ("definitely-not-a-jwt", "TOKEN_MALFORMED"),
        (12345, "TOKEN_MALFORMED"),
    ],
)
async def test_register_rejected_tokens(token: Any, code: str) -> None:
    async with running() as (_hub, port), open_websocket_url(url(port)) as ws:
        await recv(ws)
        await ws.send_message(json.dumps({"type": "register", "jwtToken": token}))
        reply = await recv(ws)
        assert reply["type"] == "error"
        assert reply["data"]["code"] == code
        assert isinstance(reply["data"]["message"], str)
        assert await closed_code(ws) == CLOSE_UNAUTHORIZED


async def test_register_without_token_is_anonymous() -> None:
    async with running() as (hub, port), open_websocket_url(url(port)) as ws:
        await recv(ws)
        reply = await register(ws, None)
        assert reply["type"] == "registered" and reply["data"]["userId"] is None
        hub.send_to_user(1, {"type": "private"})
        hub.broadcast({"type": "public"})
        assert (await recv(ws))["type"] == "public"


async def test_authorization_header() -> None:
    async with running() as (hub, port):
        async with open_websocket_url(url(port), extra_headers=bearer(mint(SECRET, 3, 60))) as ws:
            assert (await recv(ws))["type"] == "connected"
            registered = await recv(ws)
            assert registered["type"] == "registered" and registered["data"]["userId"] == 3
            hub.send_to_user(3, {"type": "hello", "data": 1})
            assert await recv(ws) == {"type": "hello", "data": 1}
        for headers, code in [
            (bearer(mint(SECRET, 3, -60)), "TOKEN_EXPIRED"),
            (bearer(mint("wrong-secret-0123456789abcdefghijkl", 3, 60)), "TOKEN_INVALID"),
            ([(b"Authorization", b"Basic dXNlcjpwYXNz")], "TOKEN_MALFORMED"),
        ]:
            async with open_websocket_url(url(port), extra_headers=headers) as ws:
                reply = await recv(ws)
                assert reply["type"] == "error" and reply["data"]["code"] == code
                assert await closed_code(ws) == CLOSE_UNAUTHORIZED


async def test_token_in_query_string_is_ignored() -> None:
    token = mint(SECRET, 3, 60)
    async with running() as (hub, port), open_websocket_url(url(port, f"/ws?token={token}")) as ws:
        assert (await recv(ws))["type"] == "connected"
        hub.send_to_user(3, {"type": "private"})
        hub.broadcast({"type": "public"})
        assert (await recv(ws))["type"] == "public"
        assert hub.user_client_count(3) == 0


async def test_per_user_cap() -> None:
    async with running(max_connections_per_user=2) as (_hub, port):
        token = mint(SECRET, 5, 60)
        async with open_websocket_url(url(port)) as a, open_websocket_url(url(port)) as b:
            for ws in (a, b):
                await recv(ws)
                assert (await register(ws, token))["type"] == "registered"
            # Re-registering an already counted connection is fine.
            assert (await register(a, token))["type"] == "registered"
            async with open_websocket_url(url(port)) as c:
                await recv(c)
                reply = await register(c, token)
                assert reply == {
                    "type": "error",
                    "data": {
                        "code": "CONNECTION_LIMIT_PER_USER_EXCEEDED",
                        "message": reply["data"]["message"],
                    },
                }
                assert await closed_code(c) == CLOSE_CONNECTION_LIMIT
            # Other users are unaffected; header auth is capped the same way.
            async with open_websocket_url(url(port), extra_headers=bearer(token)) as d:
                reply = await recv(d)
                assert reply["data"]["code"] == "CONNECTION_LIMIT_PER_USER_EXCEEDED"
                assert await closed_code(d) == CLOSE_CONNECTION_LIMIT
            async with open_websocket_url(url(port)) as e:
                await recv(e)
                assert (await register(e, mint(SECRET, 6, 60)))["type"] == "registered"


async def test_total_cap() -> None:
    async with (
        running(max_total_connections=2) as (_hub, port),
        open_websocket_url(url(port)) as a,
        open_websocket_url(url(port)) as b,
    ):
        await recv(a)
        await recv(b)
        async with open_websocket_url(url(port)) as c:
            reply = await recv(c)
            assert reply["type"] == "error"
            assert reply["data"]["code"] == "CONNECTION_LIMIT_TOTAL_EXCEEDED"
            assert await closed_code(c) == CLOSE_CONNECTION_LIMIT


async def test_user_isolation_broadcast_and_admin() -> None:
    async with (
        running() as (hub, port),
        open_websocket_url(url(port), extra_headers=bearer(mint(SECRET, 1, 60))) as u1,
        open_websocket_url(url(port), extra_headers=bearer(mint(SECRET, 2, 60))) as u2,
        open_websocket_url(url(port), extra_headers=bearer(mint(SECRET, 9, 60, True))) as admin,
        open_websocket_url(url(port)) as anon,
    ):
        for ws in (u1, u2, admin):
            await recv(ws)
            assert (await recv(ws))["type"] == "registered"
        await recv(anon)
        hub.send_to_user(1, {"type": "note", "data": "for-1"})
        hub.handle_ipc(
            "w1",
            {
                "kind": "job-events",
                "events": [{"event": "failed", "id": 77, "tag": "t", "type": "x", "user_id": 2}],
            },
        )
        hub.broadcast({"type": "all", "data": None})
        assert [(await recv(u1))["type"] for _ in range(2)] == ["note", "all"]
        assert [(await recv(u2))["type"] for _ in range(2)] == ["job", "all"]
        assert [(await recv(admin))["type"] for _ in range(3)] == ["note", "job", "all"]
        assert (await recv(anon))["type"] == "all"


async def _slow_client(
    nursery: trio.Nursery, port: int, token: str
) -> tuple[WebSocketConnection, trio.SocketStream]:
    """A client with a tiny receive buffer whose reader stops after one queued message."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    ws = await wrap_client_stream(
        nursery, stream, "127.0.0.1", "/ws", extra_headers=bearer(token), message_queue_size=1
    )
    return ws, stream


async def test_slow_client_dropped_while_fast_client_gets_everything() -> None:
    total = 2000
    hub = Hub(client_queue_size=50)
    token = mint(SECRET, 1, 60)
    async with running(hub, close_timeout=1.0) as (_, port), trio.open_nursery() as nursery:
        slow, slow_stream = await _slow_client(nursery, port, token)
        async with open_websocket_url(url(port), extra_headers=bearer(token)) as fast:
            await recv(fast)
            await recv(fast)
            received: list[int] = []
            progress = trio.Condition()

            async def read_fast() -> None:
                while len(received) < total:
                    msg = await recv(fast)
                    received.append(msg["data"]["id"])
                    async with progress:
                        progress.notify_all()

            padding = "p" * 1000
            async with trio.open_nursery() as inner:
                inner.start_soon(read_fast)
                batch = 20
                for start in range(0, total, batch):
                    events = [
                        {"event": "succeeded", "id": i, "tag": padding, "type": "t", "user_id": 1}
                        for i in range(start, start + batch)
                    ]
                    hub.handle_ipc("w", {"kind": "job-events", "events": events})
                    # Pace the publisher by the *fast* client only.
                    with trio.fail_after(TIMEOUT):
                        async with progress:
                            while len(received) < start + batch:
                                await progress.wait()
            assert received == list(range(total))
            assert hub.statistics().dropped_clients == 1
            # The slow client is disconnected: draining it ends in a close.
            code = await closed_code(slow)
            assert code in (CLOSE_CLIENT_TOO_SLOW, 1006)
            assert hub.statistics().clients == 1
        await slow_stream.aclose()


async def test_subscribe_narrowing() -> None:
    async with (
        running() as (hub, port),
        open_websocket_url(url(port), extra_headers=bearer(mint(SECRET, 4, 60))) as ws,
    ):
        await recv(ws)
        await recv(ws)
        await ws.send_message(
            json.dumps({"type": "subscribe", "data": {"jobTypes": ["email"], "tags": None}})
        )
        assert await recv(ws) == {
            "type": "subscribed",
            "data": {"jobTypes": ["email"], "tags": None, "jobIds": None},
        }
        hub.publish_job_events(
            [
                {"event": "started", "id": i, "tag": "t", "type": t, "user_id": 4}
                for i, t in enumerate(["sms", "email", "push", "email"])
            ]
        )
        hub.send_to_user(4, {"type": "note"})
        assert [(await recv(ws))["data"]["id"] for _ in range(2)] == [1, 3]
        assert (await recv(ws))["type"] == "note"
        # Invalid subscribe: error, connection stays open, old filter kept.
        await ws.send_message(json.dumps({"type": "subscribe", "data": {"jobIds": ["x"]}}))
        reply = await recv(ws)
        assert reply["type"] == "error" and reply["data"]["code"] == "INVALID_MESSAGE"
        await ws.send_message(json.dumps({"type": "subscribe", "data": {"jobIds": [9]}}))
        assert (await recv(ws))["data"]["jobIds"] == [9]
        hub.publish_job_events(
            [
                {"event": "started", "id": i, "tag": "t", "type": "sms", "user_id": 4}
                for i in (8, 9, 10)
            ]
        )
        assert (await recv(ws))["data"]["id"] == 9


async def test_invalid_messages_get_error_and_stay_open() -> None:
    async with running() as (hub, port), open_websocket_url(url(port)) as ws:
        await recv(ws)
        bad_messages: list[str | bytes] = ["not json", "[1]", '{"type": "dance"}', b"\x00binary"]
        for bad in bad_messages:
            await ws.send_message(bad)
            reply = await recv(ws)
            assert reply["type"] == "error" and reply["data"]["code"] == "INVALID_MESSAGE"
        hub.broadcast({"type": "still-here"})
        assert (await recv(ws))["type"] == "still-here"


async def test_oversized_inbound_message_closes_1009() -> None:
    async with running(max_message_bytes=1000) as (_hub, port), open_websocket_url(url(port)) as ws:
        await recv(ws)
        await ws.send_message("x" * 5000)
        assert await closed_code(ws) == 1009


async def test_wrong_path_rejected() -> None:
    async with running() as (_hub, port):
        for path in ["/", "/wss", "/ws/extra", "/graphql"]:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(url(port, path)):
                    pass
            assert info.value.status_code == 404


async def test_origin_allowlist() -> None:
    async with running(origins=("https://app.example",)) as (_hub, port):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(
                url(port), extra_headers=[(b"Origin", b"https://evil.example")]
            ):
                pass
        assert info.value.status_code == 403
        async with open_websocket_url(
            url(port), extra_headers=[(b"Origin", b"https://app.example")]
        ) as ws:
            assert (await recv(ws))["type"] == "connected"


async def test_dev_mode_every_client_is_admin() -> None:
    async with running(secret=None) as (hub, port), open_websocket_url(url(port)) as ws:
        assert (await recv(ws))["type"] == "connected"
        hub.send_to_user(123, {"type": "for-123"})
        assert (await recv(ws))["type"] == "for-123"
        reply = await register(ws, "anything")
        assert reply["type"] == "registered" and reply["data"]["admin"] is True
        assert hub.statistics().admin_clients == 1


async def test_dev_mode_requires_loopback() -> None:
    with pytest.raises(ValueError):
        await serve(Hub(), ServerSettings(host="0.0.0.0", port=0, secret=None))


async def test_handler_errors_do_not_kill_server(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running() as (hub, port):

        def explode(*args: Any) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(hub, "set_subscription", explode)
        async with open_websocket_url(url(port)) as ws:
            await recv(ws)
            await ws.send_message(json.dumps({"type": "subscribe", "data": {}}))
            assert await closed_code(ws) == CLOSE_INTERNAL_ERROR
        monkeypatch.undo()
        async with open_websocket_url(url(port)) as ws:
            assert (await recv(ws))["type"] == "connected"


class _RemovalHub(Hub):
    """Hub that signals when a client is removed (server-side disconnect)."""

    def __init__(self) -> None:
        super().__init__()
        self.removed = trio.Event()

    def remove_client(self, client: HubClient) -> None:
        super().remove_client(client)
        self.removed.set()


async def test_ping_timeout_closes_unresponsive_client() -> None:
    hub = _RemovalHub()
    async with (
        running(hub, ping_interval=0.2, close_timeout=0.5) as (_, port),
        trio.open_nursery() as nursery,
    ):
        ws, stream = await _slow_client(nursery, port, mint(SECRET, 1, 60))
        # "connected" fills the client's 1-message queue and "registered" blocks
        # its reader, so it never answers pings until we start reading.
        with trio.fail_after(TIMEOUT):
            await hub.removed.wait()
        assert (await recv(ws))["type"] == "connected"
        assert (await recv(ws))["type"] == "registered"
        assert await closed_code(ws) == CLOSE_PING_TIMEOUT
        await stream.aclose()


async def test_shutdown_closes_clients_with_going_away() -> None:
    hub = Hub()
    server_scope = trio.CancelScope()

    async def run_server(task_status: trio.TaskStatus[int]) -> None:
        with server_scope:
            settings = ServerSettings(host="127.0.0.1", port=0, secret=SECRET, ping_interval=0)
            await serve(hub, settings, task_status=task_status)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_server)
        async with open_websocket_url(url(port)) as ws:
            await recv(ws)
            server_scope.cancel()
            assert await closed_code(ws) == CLOSE_GOING_AWAY
    assert hub.statistics().clients == 0
