"""Built-in job types, loaded by every worker: ``removeOldWorkerJobs``.

``removeOldWorkerJobs`` (QuickDapp's, hourly at ``0 0 * * * *``, retried after one minute on
failure; every supervisor ensures its cron chain at start) deletes finished, non-persistent
rows whose ``remove_at`` has passed, in batches of :data:`CLEANUP_BATCH` rows (short
transactions, no long locks), and returns ``{"deleted": n}``. It never deletes an unfinished
row, so never itself while it runs. A dead row (failed for good) is also kept until it has
been dead for ``QDWORKER_DEAD_JOB_RETENTION`` seconds (default 0: no longer than any other
row). That setting reaches the worker process in its environment, as every setting does
(the supervisor passes ``Config.to_env()`` to its workers), so the handler reads it there.
"""

from __future__ import annotations

from typing import Final

from .. import _config as config_module
from .._db import statements
from .._registry import Context, cron, job

#: Rows deleted per statement by removeOldWorkerJobs.
CLEANUP_BATCH: Final = 1000

REMOVE_OLD_JOBS: Final = cron("removeOldWorkerJobs", "0 0 * * * *", retry_delay_ms=60_000)


@job(REMOVE_OLD_JOBS.type)
async def remove_old_worker_jobs(ctx: Context) -> dict[str, int]:
    """Delete old rows in batches. Settings the worker's environment holds are read when the
    run starts; one that cannot be parsed fails the run with
    :class:`~qdworker.errors.ConfigError` (retried after a minute) before anything is deleted."""
    params = {"batch": CLEANUP_BATCH,
              "dead_retention_seconds": config_module.load().dead_job_retention}  # fmt: skip
    deleted = 0
    while True:
        rows = await ctx.db.execute(statements.get("remove_old_jobs"), params)
        n = int(rows[0]["n"])
        deleted += n
        if n < CLEANUP_BATCH:
            break
    ctx.log.info("removed %d old jobs", deleted)
    return {"deleted": deleted}
