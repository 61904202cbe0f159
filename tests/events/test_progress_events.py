"""``progress`` job events from a real worker process to real websocket clients, through a
real supervisor: in order, to the job's user and to subscribed admins, filtered as others."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from procs import ROOT, SUPPORT
from qdprogress_jobs import REPORTS
from trio_websocket import WebSocketConnection, open_websocket_url

from qdworker import Config, Manager, serve
from qdworker._events.tokens import mint

SECRET = "progress-events-secret-0123456789abcdef"
TIMEOUT = 30
#: The promise: at most this many progress writes (so events) a second per run, plus the last.
MOST_PER_SECOND = 4


@pytest.fixture(autouse=True)
def _importable_test_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT), str(ROOT)]))


@asynccontextmanager
async def supervisor(db_url: str, tmp_path: Path) -> AsyncIterator[Manager]:
    config = Config(http_port=0,
        database_url=db_url, worker_count=1, ws_port=0, ws_secret=SECRET,
        jobs=("qdprogress_jobs",), data_dir=tmp_path, worker_log_level="warn",
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


async def job_events(ws: WebSocketConnection, job_id: int) -> list[dict[str, Any]]:
    """The job events of ``job_id`` up to its ``succeeded``."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["event"] != "succeeded":
        msg = await recv(ws)
        if msg["type"] == "job" and msg["data"]["id"] == job_id:
            events.append(msg["data"])
    return events


async def test_progress_events_reach_the_user_and_subscribers_in_order(
    db_url: str, tmp_path: Path
) -> None:
    async with supervisor(db_url, tmp_path) as manager:
        url = f"ws://127.0.0.1:{manager.ws_port}/ws"
        async with (
            open_websocket_url(url, extra_headers=bearer(42)) as user42,
            open_websocket_url(url, extra_headers=bearer(7)) as user7,
            open_websocket_url(url, extra_headers=bearer(1, admin=True)) as admin,
            open_websocket_url(url, extra_headers=bearer(2, admin=True)) as elsewhere,
        ):
            for ws in (user42, user7, admin, elsewhere):
                await until(ws, "registered")
            await admin.send_message(json.dumps(
                {"type": "subscribe", "data": {"jobTypes": ["progressLoop"]}}))  # fmt: skip
            await until(admin, "subscribed")
            await elsewhere.send_message(json.dumps(
                {"type": "subscribe", "data": {"jobTypes": ["progressSync"]}}))  # fmt: skip
            await until(elsewhere, "subscribed")
            job = await manager.submit_job(type="progressLoop", user_id=42)
            other = await manager.submit_job(type="progressSync", user_id=42)
            for_user = await job_events(user42, job.id)
            for_admin = await job_events(admin, job.id)
            sync_events = await job_events(elsewhere, other.id)
            # user 7 gets nothing of user 42's jobs; a marker notification bounds the wait
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("""SELECT qdworker_notify_user(7, '{"type": "marker"}')""")
            to_user7 = []
            while (msg := await recv(user7))["type"] != "marker":
                to_user7.append(msg)
    assert [m for m in to_user7 if m["type"] == "job"] == []
    assert for_user == for_admin
    progress = [e for e in for_user if e["event"] == "progress"]
    assert [e["event"] for e in for_user] == ["started", *["progress"] * len(progress),
                                              "succeeded"]  # fmt: skip
    fractions = [e["progress"]["fraction"] for e in progress]
    assert fractions == sorted(fractions) and len(set(fractions)) == len(fractions)
    last = progress[-1]["progress"]
    assert (last["fraction"], last["message"], last["data"]) == (
        1.0, f"step {REPORTS - 1}", {"i": REPORTS - 1})  # fmt: skip
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT progress, started, finished FROM worker_jobs WHERE id = %s",
                           (job.id,)).fetchone()  # fmt: skip
    assert row is not None and row[0] == last  # the row and the clients agree
    seconds = (row[2] - row[1]).total_seconds()
    assert 3 <= len(progress) <= seconds * MOST_PER_SECOND + 2, (len(progress), seconds)
    first = progress[0]
    assert (first["jobType"], first["userId"], first["attempt"]) == ("progressLoop", 42, 1)
    assert set(first["progress"]) == {"fraction", "message", "data", "at"}
    # the subscriber of the other type got that job's progress (and never the first job's)
    assert sync_events[-2]["event"] == "progress"
    assert sync_events[-2]["progress"]["message"] == "done"
    print(f"{len(progress)} progress events in {seconds:.2f} s")
