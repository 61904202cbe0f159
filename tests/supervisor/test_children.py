"""children.Child against real processes (a stand-in child speaking the IPC protocol) and a
real database: restart backoff, IPC routing, heartbeat watchdog, lease release, stopping."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from waiting import wait_until_async

from qdworker._config import Config
from qdworker._supervisor.children import Child, ChildStatistics, ChildTimings

STANDIN = Path(__file__).resolve().parents[1] / "support" / "standin_child.py"
DEADLINE_SECONDS = 15.0


def argv(mode: str) -> list[str]:
    return [sys.executable, str(STANDIN), mode]


class Inbox:
    """Collects routed messages; tests wait for one matching a predicate."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._changed = trio.Event()

    def __call__(self, worker_id: str, msg: Mapping[str, Any]) -> None:
        self.messages.append((worker_id, dict(msg)))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, key: str) -> tuple[str, dict[str, Any]]:
        while True:
            for worker_id, msg in self.messages:
                if key in msg.get("message", {}):
                    return worker_id, msg
            await self._changed.wait()


async def wait_until(child: Child, predicate: Any) -> ChildStatistics:
    """Wait until the child's statistics satisfy ``predicate`` (capped by the caller)."""

    def check() -> ChildStatistics | None:
        stats = child.statistics()
        return stats if predicate(stats) else None

    stats: ChildStatistics = await wait_until_async(check)
    return stats


def insert_job(sql: psycopg.Connection) -> int:
    row = sql.execute("INSERT INTO worker_jobs (type) VALUES ('standin') RETURNING id").fetchone()
    assert row is not None
    return int(row["id"])


def lease_of(sql: psycopg.Connection, job_id: int) -> dict[str, Any]:
    row = sql.execute(
        "SELECT lease_owner, lease_expires_at, lease_expires_at > now() AS live"
        " FROM worker_jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    assert row is not None
    return dict(row)


async def test_crash_at_start_backs_off_and_does_not_spin(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="qdworker.supervisor.children")
    child = Child(Config(), index=0, database_url=db_url, argv=argv("crash"))
    async with trio.open_nursery() as nursery:
        await nursery.start(child.run)
        await trio.sleep(4.0)  # the measurement window, not synchronisation
        stats = child.statistics()
        child.request_stop()
    # 0.5 + 1 + 2 s of backoff fit in 4 s: three or four restarts, never hundreds.
    assert 2 <= stats.restarts <= 6, stats
    assert stats.last_exit_code == 3
    assert stats.fast_crashes >= 3
    alarms = [r for r in caplog.records if r.levelno == logging.ERROR and "in a row" in r.message]
    assert alarms, "repeated fast crashes must be logged at error level"


async def test_ipc_routing_heartbeats_and_clean_stop(
    db_url: str, sql: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = insert_job(sql)
    monkeypatch.setenv("STANDIN_JOB_ID", str(job_id))  # the child takes this job's lease
    inbox = Inbox()
    child = Child(Config(), index=3, database_url=db_url, argv=argv("ok"), on_message=inbox)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE_SECONDS):
            await nursery.start(child.run)
            worker_id, msg = await inbox.wait_for("hello")
            assert msg == {"kind": "broadcast", "message": {"hello": worker_id}}
            assert worker_id == child.worker_id
            assert worker_id.endswith(":w3.1")
            stats = await wait_until(child, lambda s: s.jobs_completed >= 3)
            assert stats.alive and stats.pid is not None and stats.last_heartbeat is not None
            assert (stats.jobs_running, stats.jobs_failed, stats.jobs_claimed) == (2, 1, 3)
            child.request_stop()
    # The reader outlived the process: the message sent on the way out arrived.
    assert any("bye" in m.get("message", {}) for _, m in inbox.messages)
    stats = child.statistics()
    assert stats.restarts == 0 and stats.last_exit_code == 0 and not stats.alive
    # A lease still held after the process is gone (a clean worker releases its jobs itself,
    # except those whose handlers ignored cancellation) is ended at once.
    assert lease_of(sql, job_id)["live"] is False


async def test_lease_released_when_child_crashes(
    db_url: str, sql: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = insert_job(sql)
    monkeypatch.setenv("STANDIN_JOB_ID", str(job_id))
    child = Child(Config(), index=0, database_url=db_url, argv=argv("lease-crash"))
    async with trio.open_nursery() as nursery:
        await nursery.start(child.run)
        assert child.worker_id is not None
        slot = child.worker_id.rsplit(".", 1)[0]  # any incarnation of this slot
        with trio.fail_after(DEADLINE_SECONDS):
            while True:
                lease = lease_of(sql, job_id)
                owner = lease["lease_owner"] or ""
                if owner.rsplit(".", 1)[0] == slot and lease["live"] is False:
                    break
                await trio.sleep(0.02)
        child.request_stop()
    assert child.statistics().last_exit_code == 1


async def test_silent_child_is_killed_and_replaced(db_url: str) -> None:
    config = Config(shutdown_timeout=0.2)
    child = Child(
        config, index=0, database_url=db_url, argv=argv("hang"),
        timings=ChildTimings(heartbeat_timeout=1.0, stop_margin=0.3),
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE_SECONDS):
            await nursery.start(child.run)
            first_pid = child.statistics().pid
            stats = await wait_until(
                child, lambda s: s.restarts >= 1 and s.alive and s.last_heartbeat
            )
            assert stats.pid != first_pid
            assert stats.last_exit_code == -9  # SIGKILL
            # The replacement ignores SIGTERM too: stopping escalates to SIGKILL after
            # shutdown_timeout + stop_margin.
            child.request_stop()
    assert child.statistics().last_exit_code == -9


async def test_hurry_shortens_a_graceful_stop(db_url: str) -> None:
    inbox = Inbox()
    config = Config(shutdown_timeout=60.0)
    child = Child(config, index=0, database_url=db_url, argv=argv("slow-stop"), on_message=inbox)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE_SECONDS):
            await nursery.start(child.run)
            await inbox.wait_for("hello")
            child.request_stop()
            await inbox.wait_for("stopping")  # first SIGTERM: still finishing its jobs
            assert child.statistics().alive
            child.hurry()  # second signal: second SIGTERM, the child exits now
    assert child.statistics().last_exit_code == 0


async def test_cancellation_terminates_the_child_and_reads_its_last_messages(
    db_url: str,
) -> None:
    inbox = Inbox()
    child = Child(Config(), index=0, database_url=db_url, argv=argv("ok"), on_message=inbox)
    with trio.fail_after(DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            await nursery.start(child.run)
            await inbox.wait_for("hello")
            nursery.cancel_scope.cancel()
    stats = child.statistics()
    assert stats.last_exit_code == 0 and not stats.alive
    assert any("bye" in m.get("message", {}) for _, m in inbox.messages)
