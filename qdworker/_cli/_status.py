"""``status``: what an overview shows, from the database: jobs by status; per queue the jobs due
now and later, running, and the oldest due job's age; the workers (``qdworker_workers``:
supervisor, slot, pid, uptime, jobs run and failed, memory, restarts, alive); the cron
schedules with their lag. ``--json`` prints the same as one JSON object.

One connection, closed before the command returns; a database that does not answer within
``QDWORKER_DB_TIMEOUT`` fails the command (exit 1, the error on stderr, no password shown).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any, Final

import trio

from .._config import Config
from .._db import _metrics as metrics_store
from .._db import statements
from .._db.connect import DbOptions
from .._db.connection import connect
from .._supervisor.main import embedded_database
from ..errors import DatabaseError
from ._command import Command, fail

#: The job statuses, in the order ``job_status_counts`` and the table use.
JOB_STATUSES: Final = ("running", "due", "scheduled", "succeeded", "cancelled", "failed", "dead")
#: Workers shown in the table (newest first; ``--json`` has all that were read).
SHOWN_WORKERS: Final = 50
_MIB: Final = 1024 * 1024


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


async def read_status(config: Config) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (the ``--json`` form)."""
    async with embedded_database(config) as url:
        conn = await connect(url, "status", DbOptions(config.db_timeout))
        try:
            rows = await conn.execute(statements.get("job_status_counts"))
            figures = await conn.run(metrics_store.cluster_figures)
        finally:
            await conn.aclose()
    counts = {str(row["status"]): int(row["jobs"]) for row in rows}
    return {
        "jobs": {status: counts.get(status, 0) for status in JOB_STATUSES},
        "queues": figures.queues,
        "enqueued": figures.enqueued,
        "workers": figures.workers,
        "cron": figures.cron,
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())


def _print_jobs(jobs: dict[str, int]) -> None:
    width = max(len(s) for s in JOB_STATUSES)
    print(f"{'status':<{width}}  jobs")
    for status in JOB_STATUSES:
        print(f"{status:<{width}}  {jobs[status]:>4}")
    print(f"{'total':<{width}}  {sum(jobs.values()):>4}")


def _print_queues(queues: list[dict[str, Any]]) -> None:
    print("\nqueues" + ("" if queues else ": no pending or running jobs"))
    if queues:
        _table(["queue", "due", "scheduled", "running", "oldest due"],
               [[q["queue"], str(q["due"]), str(q["scheduled"]), str(q["running"]),
                 _age(q["oldest_due_seconds"])] for q in queues])  # fmt: skip


def _print_workers(workers: list[dict[str, Any]]) -> None:
    alive = sum(1 for w in workers if w["alive"])
    print(f"\nworkers: {alive} alive of {len(workers)} registered")
    if workers:
        _table(["supervisor", "slot", "pid", "uptime", "jobs run", "failed", "RSS", "restarts",
                "alive"],
               [[w["supervisor"] or "-", "-" if w["slot"] is None else str(w["slot"]),
                 str(w["pid"]), _age(w["uptime_seconds"]), str(w["jobs_run"]),
                 str(w["jobs_failed"]),
                 "-" if w["rss_bytes"] is None else f"{w['rss_bytes'] / _MIB:.0f} MiB",
                 str(w["restarts"]), "yes" if w["alive"] else "no"]
                for w in workers[:SHOWN_WORKERS]])  # fmt: skip


def _print_cron(cron: list[dict[str, Any]]) -> None:
    print("\ncron schedules" + ("" if cron else ": none"))
    if cron:
        _table(["type", "tag", "schedule", "next due", "lag"],
               [[c["type"], c["tag"], c["cron_schedule"],
                 "running" if c["running"] else c["next_due"].isoformat(timespec="seconds"),
                 _age(c["lag_seconds"])] for c in cron])  # fmt: skip


def _status_command(args: argparse.Namespace, config: Config) -> int:
    try:
        status = trio.run(read_status, config)
    except DatabaseError as exc:
        return fail(f"cannot read the status: {exc}")
    if args.json:
        print(json.dumps(status, default=_json_value, indent=2))
        return 0
    _print_jobs(status["jobs"])
    _print_queues(status["queues"])
    _print_workers(status["workers"])
    _print_cron(status["cron"])
    return 0


STATUS = Command(
    "status",
    "print jobs by status, queues, workers and cron schedules",
    _add_arguments,
    _status_command,
)
