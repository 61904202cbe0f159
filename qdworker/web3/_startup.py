"""What every supervisor ensures at start when ``qdworker.web3`` is among the job modules,
declared through the registry like any job module's (no supervisor names this one).

The watchChain cron job (``*/3 * * * * *``, tag ``cron:watchChain``, retried after 10 s), and
deployMulticall3 (tag ``deploy-multicall3``; a failed run is retried after
:data:`DEPLOY_RETRY_DELAY_MS`, at most :data:`DEPLOY_MAX_ATTEMPTS` attempts), submitted by
:func:`submit_deploy_multicall3`. Database errors propagate as
:class:`~qdworker.errors.DatabaseError` (start-up fails).
"""

from __future__ import annotations

from typing import Final

from .._db import statements
from .._logs import module_logger
from .._registry import Database, cron, on_startup
from . import _config as config

logger = module_logger(__name__)

#: watchChain: every 3 seconds (QuickDapp's poll interval), retried after 10 s on failure.
WATCH_CHAIN: Final = cron("watchChain", "*/3 * * * * *", retry_delay_ms=10_000)
#: deployMulticall3: retry delay after a failed run, in milliseconds.
DEPLOY_RETRY_DELAY_MS: Final = 30_000
#: deployMulticall3: attempts before giving up (a node that stays down is not retried forever).
DEPLOY_MAX_ATTEMPTS: Final = 10


@on_startup
async def submit_deploy_multicall3(db: Database, timezone: str) -> None:
    """Submit deployMulticall3 (its tag replaces a pending one: one at a time)."""
    del timezone
    cfg = config.current()
    rows = await db.execute(
        statements.get("web3_submit_deploy_multicall3"),
        {"retry_delay_ms": DEPLOY_RETRY_DELAY_MS, "max_attempts": DEPLOY_MAX_ATTEMPTS},
    )
    logger.info(
        "web3: watching %s (%s), submitted deployMulticall3 as job %d",
        cfg.primary.name,
        cfg.primary.rpc_display,
        rows[0]["id"],
    )
