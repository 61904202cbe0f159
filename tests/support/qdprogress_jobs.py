"""Job types reporting progress (imported by worker processes via QDWORKER_JOBS)."""

from __future__ import annotations

import time
from typing import Any

import trio

from qdworker import job

#: Reports in the tight loops, and how often the loops pause (to let time pass: ~2.5 s).
REPORTS = 10_000
PAUSE_EVERY = 20
PAUSE_SECONDS = 0.005


@job("progressLoop")
async def progress_loop(ctx: Any) -> dict[str, Any]:
    """REPORTS reports as fast as they come, pausing now and then; the last one is 1.0."""
    for i in range(REPORTS):
        await ctx.progress(i / (REPORTS - 1), f"step {i}", {"i": i})
        if i % PAUSE_EVERY == 0:
            await trio.sleep(PAUSE_SECONDS)
    return {"reports": REPORTS}


@job("progressSync")
def progress_sync(ctx: Any) -> dict[str, Any]:
    """The same from a plain-def handler (its thread), ending at 1.0 "done"."""
    for i in range(REPORTS):
        ctx.progress(i / REPORTS, None, {"i": i})
        if i % PAUSE_EVERY == 0:
            time.sleep(PAUSE_SECONDS)
    ctx.progress(1.0, "done")
    return {"reports": REPORTS + 1}


@job("progressInvalid")
async def progress_invalid(ctx: Any) -> dict[str, Any]:
    """Each invalid report fails only its call; then a valid one lands."""
    errors = []
    for fraction, message, data in (
        (1.5, None, None),
        (float("nan"), None, None),
        (-0.1, None, None),
        ("half", None, None),
        (0.5, "x" * 5000, None),
        (0.5, None, {"blob": "x" * 100_000}),
        (0.5, None, {"bad": object()}),
    ):
        try:
            await ctx.progress(fraction, message, data)
        except (TypeError, ValueError) as exc:
            errors.append(type(exc).__name__)
    await ctx.progress(0.25, "still going")
    return {"errors": errors}


@job("progressUncaught")
async def progress_uncaught(ctx: Any) -> None:
    await ctx.progress(2.0)


@job("progressThenWait")
async def progress_then_wait(ctx: Any) -> None:
    """Reports 0.1, waits for the test to take the claim away, reports 0.9, notes it ran."""
    await ctx.progress(0.1, "before")
    await trio.sleep(ctx.job.data.get("wait", 2.0))
    await ctx.progress(0.9, "after")
    await trio.sleep(0.5)  # longer than the write interval: the writer tries to write it
    await ctx.db.execute(
        "INSERT INTO test_runs (job_id, worker_id) VALUES (%s, %s)", (ctx.job.id, ctx.worker_id)
    )
