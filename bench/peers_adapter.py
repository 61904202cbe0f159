"""qdworker's adapter for the shared peers benchmark (``../shared/peers-bench``, README there).

Public API only, default settings:

* ``install``: ``python -m qdworker migrate`` on ``BENCH_DSN``;
* ``enqueue-bulk`` / ``enqueue-each`` / ``produce``: :class:`qdworker.Queue` (``submit_jobs`` =
  one INSERT of all rows; ``submit_job`` = one INSERT per call, autocommit);
* ``worker``: this process becomes the supervisor, ``python -m qdworker`` (exec), with
  ``DATABASE_URL=$BENCH_DSN`` and ``QDWORKER_JOBS=peers_adapter`` so its worker children import
  this file and register the ``noop`` job type. SIGTERM from the driver reaches the supervisor,
  which stops its workers gracefully. Nothing else is set except logging at warning level and
  the websocket and HTTP ports (``QDWORKER_WS_PORT=0``, ``QDWORKER_HTTP_PORT=0``: any free
  port, so a busy 8765 or 8766 cannot fail the run).
  Settings therefore are qdworker's defaults: one worker process, concurrency 10, NOTIFY wake-up
  plus 5 s poll, websocket server on.

The handler appends ``key,t,start`` to ``$BENCH_EVENTS`` (``EventLog.record``, line-buffered)
before it returns, i.e. before the completion is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
_ADAPTERS = os.environ.get("PEERS_BENCH_ADAPTERS") or str(
    PROJECT.parent / "shared/peers-bench/adapters"
)
sys.path.insert(0, _ADAPTERS)
import pycommon  # noqa: E402
import trio  # noqa: E402

import qdworker  # noqa: E402

JOB_TYPE = "noop"

_events: pycommon.EventLog | None = None


@qdworker.job(JOB_TYPE)
async def noop(ctx: qdworker.JobContext) -> None:
    global _events
    if _events is None:
        _events = pycommon.EventLog()
    data = ctx.job.data
    _events.record(data["k"], data["t"])


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QDWORKER_", "WORKER_", "SOCKET_"))
        and k not in ("DATABASE_URL", "LOG_LEVEL")
    }
    env.update(DATABASE_URL=pycommon.DSN, LOG_LEVEL="warn", WORKER_LOG_LEVEL="warn")
    env.update(extra)
    return env


class QdworkerAdapter(pycommon.Adapter):
    system = "qdworker"
    bulk_api = "Queue.submit_jobs(list) (one INSERT ... FROM jsonb_to_recordset)"
    config = {
        "settings": "qdworker defaults (WORKER_COUNT=1, QDWORKER_CONCURRENCY=10, "
        "QDWORKER_POLL_INTERVAL=5, NOTIFY wake-up, websocket server on)",
        "supervisor": "python -m qdworker (worker child python -m qdworker._worker)",
        "driver": "psycopg 3 sync, via trio threads",
        "log_level": "warn",
    }
    pending_sql = f"select count(*) from worker_jobs where finished is null and type = '{JOB_TYPE}'"
    runner = staticmethod(trio.run)
    sleep = staticmethod(trio.sleep)

    def version(self) -> str:
        return qdworker.__version__

    async def install(self) -> None:
        await trio.run_process(
            [sys.executable, "-m", "qdworker", "migrate"], env=_env(), stdout=subprocess.DEVNULL
        )

    async def open(self) -> None:
        self.queue = await qdworker.Queue(pycommon.DSN).open()

    async def close(self) -> None:
        await self.queue.aclose()

    async def enqueue_bulk(self, payloads: list[dict[str, Any]]) -> None:
        await self.queue.submit_jobs([{"type": JOB_TYPE, "data": p} for p in payloads])

    async def enqueue_one(self, p: dict[str, Any]) -> None:
        await self.queue.submit_job(type=JOB_TYPE, data=p)

    async def worker(self, events: pycommon.EventLog) -> None:
        del events  # the worker children write the events
        path = os.pathsep.join(p for p in (str(HERE), _ADAPTERS, os.environ.get("PYTHONPATH")) if p)
        env = _env(
            QDWORKER_JOBS="peers_adapter",
            QDWORKER_WS_PORT="0",
            QDWORKER_HTTP_PORT="0",
            PYTHONPATH=path,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "qdworker", "run"], env)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    pycommon.main(QdworkerAdapter)
