from __future__ import annotations

import json
import logging
import os
import random
import struct
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from qdworker import _protocol as protocol

SMALL_MAX = 4096
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def valid(i: int) -> bytes:
    return frame(json.dumps({"kind": "heartbeat", "n": i}).encode())


async def collect(data: bytes, *, max_frame_bytes: int = SMALL_MAX, chunk: int = 997) -> list[Any]:
    """Feed ``data`` through a memory stream in odd-sized chunks and read all frames."""
    send, recv = trio.testing.memory_stream_one_way_pair()
    out: list[Any] = []

    async def writer() -> None:
        for i in range(0, len(data), chunk):
            await send.send_all(data[i : i + chunk])
        await send.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        with trio.fail_after(10):
            async for msg in protocol.frames(recv, max_frame_bytes=max_frame_bytes):
                out.append(msg)
    return out


async def test_round_trip_over_socketpair() -> None:
    parent, child_sock = protocol.socketpair()
    child = trio.SocketStream(trio.socket.from_stdlib_socket(child_sock))
    messages: list[dict[str, Any]] = [
        {"kind": "worker-started", "pid": 123},
        {"kind": "send-to-user", "user_id": 5, "message": {"type": "hi", "data": "é✓"}},
        {"kind": "broadcast", "message": {"type": "b", "data": None}},
        {
            "kind": "job-events",
            "events": [
                {"event": "succeeded", "id": i, "tag": "t", "type": "x", "user_id": 1}
                for i in range(500)
            ],
        },
    ]
    received: list[dict[str, Any]] = []
    async with child, parent:

        async def produce() -> None:
            for m in messages:
                await protocol.send(child, m)
            await child.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            with trio.fail_after(10):
                async for msg in protocol.frames(parent):
                    received.append(msg)
    assert received == messages


async def test_send_rejects_oversized_and_invalid() -> None:
    send, recv = trio.testing.memory_stream_one_way_pair()
    with pytest.raises(protocol.FrameTooLargeError):
        await protocol.send(
            send, {"kind": "broadcast", "message": {"x": "y" * 100}}, max_frame_bytes=50
        )
    with pytest.raises(protocol.FrameTooLargeError):
        await protocol.send(send, {"kind": "b", "x": "y" * protocol.MAX_FRAME_BYTES})
    with pytest.raises(TypeError):
        await protocol.send(send, {"message": 1})
    with pytest.raises(ValueError):
        await protocol.send(send, {"kind": "x", "v": float("nan")})
    with pytest.raises(ValueError):
        await protocol.send(send, {"kind": "x", "v": object()})
    # Nothing was written by the failed sends: the stream is still clean.
    await protocol.send(send, {"kind": "heartbeat"})
    await send.aclose()
    assert [m async for m in protocol.frames(recv)] == [{"kind": "heartbeat"}]


async def test_malformed_frames_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    bad: Sequence[bytes] = [
        frame(b"\xff\xfe not utf-8"),
        frame(b"{not json"),
        frame(b"[1, 2, 3]"),
        frame(b'{"no_kind": 1}'),
        frame(b'{"kind": 5}'),
        frame(b'{"kind": "x", "v": NaN}'),
        frame(b""),
        frame(b"[" * 100_0 + b"]" * 100_0),
    ]
    data = valid(0) + b"".join(b + valid(i + 1) for i, b in enumerate(bad))
    with caplog.at_level(logging.WARNING, logger=protocol.__name__):
        out = await collect(data)
    assert [m["n"] for m in out] == list(range(len(bad) + 1))
    assert sum("dropping IPC frame" in r.getMessage() for r in caplog.records) == len(bad)
    assert all(len(r.getMessage()) < 400 for r in caplog.records)


async def test_oversized_frame_is_skipped() -> None:
    big = b"x" * (SMALL_MAX * 20 + 3)
    data = valid(1) + frame(big) + valid(2) + frame(b"y" * (SMALL_MAX + 1)) + valid(3)
    assert [m["n"] for m in await collect(data)] == [1, 2, 3]
    # Same with the real limit and a > 1 MiB frame.
    huge = frame(json.dumps({"kind": "b", "x": "z" * protocol.MAX_FRAME_BYTES}).encode())
    out = await collect(
        valid(1) + huge + valid(2), max_frame_bytes=protocol.MAX_FRAME_BYTES, chunk=65536
    )
    assert [m["n"] for m in out] == [1, 2]


async def test_truncated_stream_ends_cleanly() -> None:
    assert [m["n"] for m in await collect(valid(1) + valid(2)[:-3])] == [1]
    assert [m["n"] for m in await collect(valid(1) + b"\x00\x00")] == [1]
    # EOF inside an oversized frame that is being discarded.
    assert [m["n"] for m in await collect(valid(1) + struct.pack(">I", 10**9) + b"abc")] == [1]


async def test_fuzz_mixed_frames_keep_reader_going() -> None:
    rng = random.Random(1234)
    for _round in range(30):
        parts: list[bytes] = []
        expected: list[int] = []
        for i in range(40):
            choice = rng.random()
            if choice < 0.4:
                parts.append(valid(i))
                expected.append(i)
            elif choice < 0.7:
                parts.append(frame(rng.randbytes(rng.randrange(0, 300))))
            elif choice < 0.85:
                parts.append(frame(rng.randbytes(rng.randrange(SMALL_MAX + 1, SMALL_MAX * 3))))
            else:
                junk = json.dumps(rng.choice([[1], "s", 3, None, {"kind": None}, {"k": "v"}]))
                parts.append(frame(junk.encode()))
        out = await collect(b"".join(parts), chunk=rng.randrange(1, 5000))
        assert [m["n"] for m in out] == expected


async def test_fuzz_random_bytes_never_raise() -> None:
    rng = random.Random(99)
    for _round in range(50):
        data = rng.randbytes(rng.randrange(0, 20_000))
        out = await collect(data, chunk=rng.randrange(1, 3000))
        assert all(isinstance(m, dict) and isinstance(m.get("kind"), str) for m in out)


async def test_broken_and_closed_streams_end_iteration() -> None:
    parent, child_sock = protocol.socketpair()
    child_sock.close()
    async with parent:
        with trio.fail_after(5):
            assert [m async for m in protocol.frames(parent)] == []
    # Reading from a stream we closed ourselves ends the iterator too.
    with trio.fail_after(5):
        assert [m async for m in protocol.frames(parent)] == []


def test_child_stream_from_env_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QDWORKER_TEST_FD", raising=False)
    with pytest.raises(RuntimeError):
        protocol.child_stream_from_env("QDWORKER_TEST_FD")
    monkeypatch.setenv("QDWORKER_TEST_FD", "nope")
    with pytest.raises(RuntimeError):
        protocol.child_stream_from_env("QDWORKER_TEST_FD")


CHILD_SCRIPT = """
import trio
from qdworker import _protocol as protocol

async def main():
    stream = protocol.child_stream_from_env()
    async with stream:
        await protocol.send(stream, {"kind": "worker-started", "pid": 1})
        async for msg in protocol.frames(stream):
            await protocol.send(stream, {"kind": "heartbeat", "echo": msg})
            break
        await protocol.send(stream, {"kind": "worker-shutdown"})

trio.run(main)
"""


async def test_child_process_round_trip() -> None:
    parent, child_sock = protocol.socketpair()
    env = {**os.environ, **protocol.ipc_env(child_sock)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    received: list[dict[str, Any]] = []
    async with parent, trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", CHILD_SCRIPT],
                env=env,
                pass_fds=(child_sock.fileno(),),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        )
        child_sock.close()
        with trio.fail_after(30):
            async for msg in protocol.frames(parent):
                received.append(msg)
                if msg["kind"] == "worker-started":
                    await protocol.send(parent, {"kind": "broadcast", "message": {"a": 1}})
        assert proc.pid > 0
    assert [m["kind"] for m in received] == ["worker-started", "heartbeat", "worker-shutdown"]
    assert received[1]["echo"] == {"kind": "broadcast", "message": {"a": 1}}
