"""A tiny application's job module (the code under test in ``test_app_jobs.py``)."""

from __future__ import annotations

from typing import Any

import qdworker


@qdworker.job("welcomeEmail")
async def welcome_email(ctx: Any) -> dict[str, Any]:
    address = ctx.job.data["to"]
    await ctx.notify_user(ctx.job.user_id, {"type": "emailSent", "data": {"to": address}})
    return {"sent_to": address}


async def sign_up(queue: qdworker.Queue, user_id: int, address: str) -> qdworker.Job:
    """What the application does when someone signs up: it enqueues the welcome email."""
    return await queue.submit_job(
        type="welcomeEmail", data={"to": address}, user_id=user_id, tag=f"welcome:{user_id}"
    )
