"""Events from real worker processes to real websocket clients, through a real supervisor."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from procs import ROOT, SUPPORT
from trio_websocket import WebSocketConnection, open_websocket_url, wrap_client_stream

from qdworker import Config, Manager, Queue, serve
from qdworker._events.tokens import mint

SECRET = "end-to-end-secret-0123456789abcdef"
TIMEOUT = 30


@pytest.fixture(autouse=True)
def _importable_test_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT), str(ROOT)]))


@asynccontextmanager
async def supervisor(db_url: str, tmp_path: Path) -> AsyncIterator[Manager]:
    config = Config(http_port=0,
        database_url=db_url, worker_count=1, ws_port=0, ws_secret=SECRET,
        jobs=("qdtest_jobs",), data_dir=tmp_path, worker_log_level="warn",
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(serve, config)
        try:
            yield manager
        finally:
            await manager.shutdown()


def bearer(user_id: int, admin: bool = False) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {mint(SECRET, user_id, 600, admin)}".encode())]


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        msg = json.loads(await ws.get_message())
    assert isinstance(msg, dict)
    return msg


async def until(ws: WebSocketConnection, wanted: str) -> dict[str, Any]:
    while (msg := await recv(ws))["type"] != wanted:
        pass
    return msg


async def test_sql_insert_produces_started_then_succeeded(db_url: str, tmp_path: Path) -> None:
    async with supervisor(db_url, tmp_path) as manager:
        url = f"ws://127.0.0.1:{manager.ws_port}/ws"
        async with open_websocket_url(url, extra_headers=bearer(1, admin=True)) as ws:
            assert (await recv(ws))["type"] == "connected"
            assert (await recv(ws))["data"]["admin"] is True
            with psycopg.connect(db_url, autocommit=True) as conn:
                row = conn.execute(
                    "INSERT INTO worker_jobs (type, user_id, tag) VALUES ('noop', 5, 'e2e') RETURNING id"
                ).fetchone()
            assert row is not None
            started = await until(ws, "job")
            succeeded = await until(ws, "job")
    assert started["data"]["event"] == "started" and succeeded["data"]["event"] == "succeeded"
    for msg in (started, succeeded):
        data = msg["data"]
        assert (data["id"], data["jobType"], data["tag"], data["userId"], data["attempt"]) == (
            row[0], "noop", "e2e", 5, 1)  # fmt: skip
        assert "data" not in data and "result" not in data  # small and safe by default
    assert succeeded["data"]["finished"] is not None


async def test_notify_user_reaches_only_that_user_and_broadcast_reaches_all(
    db_url: str, tmp_path: Path
) -> None:
    async with supervisor(db_url, tmp_path) as manager:
        url = f"ws://127.0.0.1:{manager.ws_port}/ws"
        async with (
            open_websocket_url(url, extra_headers=bearer(42)) as user42,
            open_websocket_url(url, extra_headers=bearer(7)) as user7,
            open_websocket_url(url, extra_headers=bearer(1, admin=True)) as admin,
            open_websocket_url(url) as anonymous,
        ):
            for ws in (user42, user7, admin):
                await until(ws, "registered")
            await until(anonymous, "connected")
            await manager.submit_job(type="notify", user_id=42, data={"n": 1})

            async def non_job(ws: WebSocketConnection, count: int) -> list[dict[str, Any]]:
                got = []
                while len(got) < count:
                    msg = await recv(ws)
                    if msg["type"] != "job":
                        got.append(msg)
                return got

            assert await non_job(user42, 2) == [
                {"type": "hello", "data": {"n": 1}}, {"type": "everyone", "data": {}}]  # fmt: skip
            assert await non_job(admin, 2) == [
                {"type": "hello", "data": {"n": 1}}, {"type": "everyone", "data": {}}]  # fmt: skip
            assert await non_job(user7, 1) == [{"type": "everyone", "data": {}}]  # never "hello"
            assert await non_job(anonymous, 1) == [{"type": "everyone", "data": {}}]


async def test_client_that_never_reads_is_dropped_while_another_gets_every_event(
    db_url: str, tmp_path: Path
) -> None:
    total = 2000
    async with supervisor(db_url, tmp_path) as manager, trio.open_nursery() as nursery:
        port = manager.ws_port
        assert port is not None and manager.hub is not None
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stalled = await wrap_client_stream(
            nursery, trio.SocketStream(sock), "127.0.0.1", "/ws",
            extra_headers=bearer(1, admin=True), message_queue_size=1,
        )  # fmt: skip
        # The reading client runs in a process of its own, as a browser would.
        token = mint(SECRET, 2, 600, admin=True)
        reader = await trio.lowlevel.open_process(
            [sys.executable, str(SUPPORT / "ws_reader.py"), f"ws://127.0.0.1:{port}/ws", token,
             str(total)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert reader.stdout is not None
        lines = _lines(reader.stdout)
        with trio.fail_after(TIMEOUT):
            assert await anext(lines) == "ready"
            async with Queue(db_url) as queue:
                jobs = await queue.submit_jobs(
                    {"type": "noop", "tag": f"{'t' * 200}-{i}"} for i in range(total)
                )
            result = await anext(lines)
            assert await reader.wait() == 0, result
        seen: dict[int, list[str]] = {job.id: [] for job in jobs}
        for job_id, event in json.loads(result):
            if job_id in seen:
                seen[job_id].append(event)
        assert all(events == ["started", "succeeded"] for events in seen.values())
        assert manager.hub.statistics().dropped_clients == 1  # the one that never read
        await stalled.aclose()
        nursery.cancel_scope.cancel()


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    """Lines of a child's stdout."""
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()
