"""``cancel ID`` and ``status``: jobs from the command line."""

from __future__ import annotations

import argparse
from typing import Any

import trio

from .._client import Queue
from .._config import Config
from .._db import statements
from .._db.connect import DbOptions
from .._db.connection import connect
from .._supervisor.main import embedded_database
from ._command import Command, no_arguments


def _add_cancel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", type=int, metavar="ID", help="the job's id")
    parser.add_argument("--reason", help="stored in the job's result")


async def _cancel(config: Config, job_id: int, reason: str | None) -> str:
    async with embedded_database(config) as url, Queue(url) as queue:
        return await queue.cancel_job(job_id, reason)


def _cancel_command(args: argparse.Namespace, config: Config) -> int:
    outcome = trio.run(_cancel, config, args.job_id, args.reason)
    print(outcome)
    return 1 if outcome == "not_found" else 0


async def _status(config: Config) -> list[dict[str, Any]]:
    async with embedded_database(config) as url:
        conn = await connect(url, "status", DbOptions(config.db_timeout))
        try:
            return await conn.execute(statements.get("job_status_counts"))
        finally:
            await conn.aclose()


def _status_command(args: argparse.Namespace, config: Config) -> int:
    del args
    rows = trio.run(_status, config)
    counts = {str(row["status"]): int(row["jobs"]) for row in rows}
    order = ("running", "due", "scheduled", "succeeded", "cancelled", "failed", "dead")
    width = max(len(s) for s in order)
    print(f"{'status':<{width}}  jobs")
    for status in order:
        print(f"{status:<{width}}  {counts.get(status, 0):>4}")
    print(f"{'total':<{width}}  {sum(counts.values()):>4}")
    return 0


CANCEL = Command("cancel", "cancel a job", _add_cancel, _cancel_command)
STATUS = Command("status", "print job counts by status", no_arguments, _status_command)
