"""The probes: ``/healthz`` answers while the supervisor runs; ``/readyz`` says ready once a
worker beats and the database answers, and 503 (with the reason) without a live worker."""

from __future__ import annotations

import sys

import httpx
import trio
from waiting import wait_until_async

from qdworker import Config, Manager, serve


async def _ready(client: httpx.AsyncClient, within: float = 15.0) -> httpx.Response:
    async def ready() -> httpx.Response | None:
        response = await client.get("/readyz")
        return response if response.status_code == 200 else None

    with trio.fail_after(within):
        response: httpx.Response = await wait_until_async(ready)
    return response


async def test_probes_answer_on_the_http_port(db_url: str) -> None:
    config = Config(database_url=db_url, worker_count=1, ws_enabled=False, http_port=0)
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(serve, config)
        assert manager.http_port
        base = f"http://127.0.0.1:{manager.http_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).text == "ok\n"
            ready = await _ready(client)
            assert ready.status_code == 200, ready.text
            assert ready.json() == {"ready": True}
        await manager.shutdown()


async def test_readyz_is_503_without_a_live_worker(db_url: str) -> None:
    # A worker that cannot start (its argv exits at once) never beats.
    config = Config(database_url=db_url, worker_count=1, ws_enabled=False, http_port=0)
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(
            lambda task_status: serve(config, worker_argv=argv, task_status=task_status)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{manager.http_port}") as client:
            response = await client.get("/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["ready"] is False
            assert any(reason.startswith("workers:") for reason in body["reasons"]), body
            assert (await client.get("/healthz")).status_code == 200
        await manager.shutdown(immediate=True)
