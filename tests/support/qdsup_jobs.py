"""Job types for supervisor end-to-end tests (imported by real workers via QDWORKER_JOBS)."""

from __future__ import annotations

import os
from typing import Any

import trio

from qdworker._registry import job


@job("supSleep")
async def sup_sleep(ctx: Any) -> dict[str, Any]:
    await trio.sleep(float(ctx.job.data.get("seconds", 60)))
    return {"slept": True}


@job("supDie")
async def sup_die(ctx: Any) -> None:
    os._exit(17)  # the worker process dies with this job running
