"""Job types that write with ``ctx.transaction()`` (exactly-once effects), for the tests."""

from __future__ import annotations

import os
from typing import Any

import trio

from qdworker import job


@job("ledger")
async def ledger(ctx: Any) -> Any:
    """Inserts a ledger row in the job's transaction. ``data``: ``sleep_in_tx`` (seconds
    inside the transaction), ``exit_after_commit`` (die right after the commit)."""
    async with ctx.transaction() as tx:
        await tx.execute(
            "INSERT INTO ledger (job_id, claims) VALUES (%s, %s)", (ctx.job.id, ctx.fencing_token)
        )
        await trio.sleep(float(ctx.job.data.get("sleep_in_tx", 0)))
        tx.result = {"written": True}
    if ctx.job.data.get("exit_after_commit"):
        os._exit(9)
    return {"returned": True}
