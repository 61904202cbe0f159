"""serve() in-process: start-up, Manager, websocket port, stand-in children, the embedded path."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from qdworker import _devdb as devdb
from qdworker._config import Config
from qdworker._db import migrate
from qdworker._supervisor.main import Manager, serve
from qdworker.errors import ConfigError

STANDIN = Path(__file__).resolve().parents[1] / "support" / "standin_child.py"
DEADLINE_SECONDS = 20.0


async def test_manager_submits_jobs_and_shuts_down(db_url: str) -> None:
    config = Config(http_port=0, database_url=db_url, worker_count=0, ws_enabled=False)
    with trio.fail_after(DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            manager: Manager = await nursery.start(serve, config)
            assert manager.get_worker_count() == 0
            assert manager.url == db_url and manager.ws_port is None
            job = await manager.submit_job(type="sendEmail", data={"to": "a@b.c"}, user_id=7)
            assert job.id > 0 and job.type == "sendEmail"
            stats = manager.statistics()
            assert stats.workers == () and not stats.stopping
            await manager.shutdown()
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT type, user_id FROM worker_jobs WHERE id = %s", (job.id,))
        assert row.fetchone() == ("sendEmail", 7)


async def test_children_messages_reach_on_message_and_stop_cleanly(db_url: str) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    both_said_hello = trio.Event()

    def on_message(worker_id: str, msg: Mapping[str, Any]) -> None:
        seen.append((worker_id, dict(msg)))
        if len({w for w, m in seen if "hello" in m.get("message", {})}) == 2:
            both_said_hello.set()

    config = Config(http_port=0, database_url=db_url, worker_count=2, ws_enabled=False)
    argv = [sys.executable, str(STANDIN), "ok"]
    with trio.fail_after(DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            manager: Manager = await nursery.start(
                lambda task_status: serve(
                    config, on_message=on_message, worker_argv=argv, task_status=task_status
                )
            )
            assert manager.get_worker_count() == 2
            await both_said_hello.wait()
            ids = [w.worker_id for w in manager.statistics().workers]
            assert len(set(ids)) == 2 and all(i and i.endswith((":w0.1", ":w1.1")) for i in ids)
            await manager.shutdown()
    workers = manager.statistics().workers
    assert [w.last_exit_code for w in workers] == [0, 0]
    assert all(w.restarts == 0 and not w.alive for w in workers)


async def test_websocket_server_port_is_reported(db_url: str) -> None:
    config = Config(http_port=0, database_url=db_url, worker_count=0, ws_port=0)
    with trio.fail_after(DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            manager: Manager = await nursery.start(serve, config)
            assert manager.ws_port is not None and manager.ws_port > 0
            assert manager.hub is not None and manager.statistics().hub is not None
            stream = await trio.open_tcp_stream("127.0.0.1", manager.ws_port)
            await stream.aclose()
            await manager.shutdown()


async def test_public_websocket_without_secret_is_refused(db_url: str) -> None:
    config = Config(http_port=0, database_url=db_url, worker_count=0, ws_host="0.0.0.0", ws_port=0)
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConfigError, match="QDWORKER_WS_SECRET"):
            await nursery.start(serve, config)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Own base under /tmp, traversable by the embedded_postgres user when running as root
    # (pytest's tmp_path sits below /tmp/pytest-of-root, which is 0700).
    base = Path(tempfile.mkdtemp(prefix="qdworker-supervisor-test-"))
    base.chmod(0o711)
    try:
        yield base / ".qdworker"
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_embedded_database_is_started_migrated_and_stopped(data_dir: Path) -> None:
    config = Config(
        http_port=0, database_url=None, data_dir=data_dir, worker_count=0, ws_enabled=False
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            manager: Manager = await nursery.start(serve, config)
            assert devdb.url_for(data_dir) == manager.url
            with psycopg.connect(manager.url) as conn:
                versions = conn.execute("SELECT version FROM qdworker_migrations").fetchall()
            assert versions == [(m.version,) for m in migrate.available()]
            await manager.shutdown()
    assert devdb.url_for(data_dir) is None
