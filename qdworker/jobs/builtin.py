"""Built-in job types and the cron jobs every supervisor ensures at start.

``removeOldWorkerJobs`` (QuickDapp's, hourly at ``0 0 * * * *``, retried after one minute on
failure) deletes finished, non-persistent rows whose ``remove_at`` has passed, in batches of
:data:`CLEANUP_BATCH` rows (short transactions, no long locks), and returns
``{"deleted": n}``. It never deletes an unfinished row, so never itself while it runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from ..db import statements
from ..db.connection import Connection
from ..registry import job
from ..schedule import cron
from ..worker.context import JobContext

__all__ = ["BUILTIN_CRON_JOBS", "CLEANUP_BATCH", "CronJob", "ensure_builtin_jobs"]

logger = logging.getLogger(__name__)

#: Rows deleted per statement by removeOldWorkerJobs.
CLEANUP_BATCH = 1000


@dataclass(frozen=True)
class CronJob:
    type: str
    schedule: str
    retry_delay_ms: int

    @property
    def tag(self) -> str:
        return f"cron:{self.type}"


BUILTIN_CRON_JOBS: tuple[CronJob, ...] = (CronJob("removeOldWorkerJobs", "0 0 * * * *", 60_000),)


@job("removeOldWorkerJobs")
async def remove_old_worker_jobs(ctx: JobContext) -> dict[str, int]:
    deleted = 0
    while True:
        rows = await ctx.db.execute(statements.get("remove_old_jobs"), {"batch": CLEANUP_BATCH})
        n = int(rows[0]["n"])
        deleted += n
        if n < CLEANUP_BATCH:
            break
    ctx.log.info("removed %d old jobs", deleted)
    return {"deleted": deleted}


async def ensure_cron_jobs(conn: Connection, jobs: tuple[CronJob, ...], timezone: str) -> list[int]:
    """Insert each cron job unless its chain already has an unfinished row. Safe to run from
    many supervisors at once (each tag is locked while checked). Returns the new rows' ids."""

    def ensure(raw: psycopg.Connection[dict[str, Any]]) -> list[int]:
        created: list[int] = []
        for cron_job in jobs:
            with raw.transaction():
                raw.execute(statements.get("tag_lock"), {"tag": cron_job.tag})
                row = raw.execute(statements.get("db_now")).fetchone()
                assert row is not None
                due = cron.next_tick(cron_job.schedule, row["now"], row["now"], timezone)
                inserted = raw.execute(
                    statements.get("insert_cron_if_absent"),
                    {
                        "tag": cron_job.tag,
                        "type": cron_job.type,
                        "due": due,
                        "cron_schedule": cron_job.schedule,
                        "retry_delay_ms": cron_job.retry_delay_ms,
                    },
                ).fetchone()
                if inserted is not None:
                    created.append(int(inserted["id"]))
                    logger.info(
                        "scheduled %s (%s) as job %d",
                        cron_job.type,
                        cron_job.schedule,
                        inserted["id"],
                    )
        return created

    return await conn.run(ensure)


async def ensure_builtin_jobs(conn: Connection, timezone: str) -> list[int]:
    """Ensure the built-in cron jobs (see :data:`BUILTIN_CRON_JOBS`)."""
    return await ensure_cron_jobs(conn, BUILTIN_CRON_JOBS, timezone)
