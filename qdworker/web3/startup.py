"""What a supervisor does at start when ``qdworker.web3`` is in its job modules.

``await ensure_web3_jobs(conn, timezone)`` ensures the watchChain cron job (``*/3 * * * * *``,
tag ``cron:watchChain``, retried after 10 s) like the built-in cron jobs, and submits
deployMulticall3 (tag ``deploy-multicall3``; a failed run is retried after
:data:`DEPLOY_RETRY_DELAY_MS`, at most :data:`DEPLOY_MAX_ATTEMPTS` attempts). Importing this
module validates the web3 settings (:class:`~qdworker.errors.ConfigError`, one line). Returns
the ids of the rows it inserted; database errors propagate as
:class:`~qdworker.errors.DatabaseError`. Does not own ``conn``.
"""

from __future__ import annotations

import logging

from ..db import statements
from ..db.connection import Connection
from ..jobs.builtin import CronJob, ensure_cron_jobs
from . import config

__all__ = ["DEPLOY_MAX_ATTEMPTS", "DEPLOY_RETRY_DELAY_MS", "WEB3_CRON_JOBS", "ensure_web3_jobs"]

logger = logging.getLogger(__name__)

#: watchChain: every 3 seconds (QuickDapp's poll interval), retried after 10 s on failure.
WEB3_CRON_JOBS: tuple[CronJob, ...] = (CronJob("watchChain", "*/3 * * * * *", 10_000),)
#: deployMulticall3: retry delay after a failed run, in milliseconds.
DEPLOY_RETRY_DELAY_MS = 30_000
#: deployMulticall3: attempts before giving up (a node that stays down is not retried forever).
DEPLOY_MAX_ATTEMPTS = 10


async def ensure_web3_jobs(conn: Connection, timezone: str) -> list[int]:
    """Ensure watchChain's cron job and submit deployMulticall3; return the new rows' ids."""
    cfg = config.current()
    created = await ensure_cron_jobs(conn, WEB3_CRON_JOBS, timezone)
    rows = await conn.execute(
        statements.get("web3_submit_deploy_multicall3"),
        {
            "retry_delay_ms": DEPLOY_RETRY_DELAY_MS,
            "max_attempts": DEPLOY_MAX_ATTEMPTS,
        },
    )
    created.append(int(rows[0]["id"]))
    logger.info(
        "web3: watching %s (%s), submitted deployMulticall3 as job %d",
        cfg.primary.name,
        cfg.primary.rpc_display,
        rows[0]["id"],
    )
    return created
