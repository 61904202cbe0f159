"""Job types used by the tests (imported by worker processes via QDWORKER_JOBS)."""

from __future__ import annotations

import os
import time
from typing import Any

import trio

from qdworker import job


@job("noop")
async def noop(ctx: Any) -> dict[str, Any]:
    return {"ok": True}


@job("echo")
async def echo(ctx: Any) -> Any:
    return ctx.job.data


@job("boom")
async def boom(ctx: Any) -> None:
    raise ValueError(ctx.job.data.get("message", "kaboom"))


@job("badResult")
async def bad_result(ctx: Any) -> Any:
    return {"not json": object()}


@job("hugeResult")
async def huge_result(ctx: Any) -> Any:
    return {"blob": "x" * (2 * 1024 * 1024)}


@job("sleep")
async def sleep(ctx: Any) -> dict[str, Any]:
    await ctx.db.execute(
        "INSERT INTO test_runs (job_id, worker_id) VALUES (%s, %s)", (ctx.job.id, ctx.worker_id)
    )
    await trio.sleep(float(ctx.job.data.get("seconds", 1)))
    return {"slept": ctx.job.data.get("seconds", 1)}


@job("record")
async def record(ctx: Any) -> dict[str, Any]:
    await ctx.db.execute(
        "INSERT INTO test_runs (job_id, worker_id) VALUES (%s, %s)", (ctx.job.id, ctx.worker_id)
    )
    return {"recorded": ctx.job.id}


@job("threaded")
def threaded(ctx: Any) -> dict[str, Any]:
    time.sleep(0.01)
    return {"thread": True}


@job("aio", runtime="asyncio")
async def aio(ctx: Any) -> dict[str, Any]:
    import asyncio

    await asyncio.sleep(0.01)
    rows = await ctx.db.execute("SELECT 41 + 1 AS answer")
    return {"asyncio": True, "answer": rows[0]["answer"]}


@job("exit")
async def exit_process(ctx: Any) -> None:
    await ctx.db.execute(
        "INSERT INTO test_runs (job_id, worker_id) VALUES (%s, %s)", (ctx.job.id, ctx.worker_id)
    )
    os._exit(17)


@job("blockLoop", timeout=1.0)
async def block_loop(ctx: Any) -> None:
    time.sleep(float(ctx.job.data.get("seconds", 30)))  # noqa: ASYNC251 (the point of the test)


@job("blockThread", timeout=1.0)
def block_thread(ctx: Any) -> None:
    time.sleep(float(ctx.job.data.get("seconds", 30)))


@job("notify")
async def notify(ctx: Any) -> None:
    await ctx.notify_user(ctx.job.user_id, {"type": "hello", "data": ctx.job.data})
    await ctx.broadcast({"type": "everyone", "data": {}})


@job("nulResult")
async def nul_result(ctx: Any) -> Any:
    return {"text": "a\x00b"}


@job("nulError")
async def nul_error(ctx: Any) -> None:
    raise ValueError("bad \x00 byte and a lone \ud800 surrogate")


def _record(mark: str, ctx: Any) -> None:
    """One line ``mark job claims pid time`` appended to QDTEST_RUNS_FILE (O_APPEND: whole
    lines, even from several processes at once), written without the database."""
    line = f"{mark} {ctx.job.id} {ctx.job.claims} {os.getpid()} {time.time():.6f}\n"
    fd = os.open(os.environ["QDTEST_RUNS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@job("chaos")
async def chaos(ctx: Any) -> dict[str, Any]:
    """Records its start and end (also when cancelled) in QDTEST_RUNS_FILE; sleeps
    ``data.seconds``; needs no database."""
    _record("S", ctx)
    try:
        await trio.sleep(float(ctx.job.data.get("seconds", 0)))
    finally:
        _record("E", ctx)
    return {"ok": True}


@job("raiseOnCancel")
async def raise_on_cancel(ctx: Any) -> dict[str, Any]:
    """Records its start in ``test_runs``, sleeps ``data.seconds`` (default 60) and, when
    cancelled, raises a ValueError instead of letting the cancellation through."""
    await ctx.db.execute(
        "INSERT INTO test_runs (job_id, worker_id) VALUES (%s, %s)", (ctx.job.id, ctx.worker_id)
    )
    try:
        await trio.sleep(float(ctx.job.data.get("seconds", 60)))
    except trio.Cancelled as exc:
        raise ValueError("raised while being cancelled") from exc
    return {"slept": True}


@job("span")
async def span(ctx: Any) -> dict[str, Any]:
    """Record when the handler ran (database clock) in test_spans; sleep data.seconds."""
    job = ctx.job
    await ctx.db.execute(
        "INSERT INTO test_spans (job_id, claims, queue, key, started) "
        "VALUES (%s, %s, %s, %s, clock_timestamp())",
        (job.id, job.claims, job.queue, job.concurrency_key),
    )
    await trio.sleep(float(job.data.get("seconds", 0.05)))
    await ctx.db.execute(
        "UPDATE test_spans SET ended = clock_timestamp() WHERE job_id = %s AND claims = %s",
        (job.id, job.claims),
    )
    return {"ok": True}


@job("burnCpu")
async def burn_cpu(ctx: Any) -> dict[str, Any]:
    """Spin for ``data.seconds`` (default 0.5) of this process's CPU time, never yielding."""
    end = time.process_time() + float(ctx.job.data.get("seconds", 0.5))
    spins = 0
    while time.process_time() < end:
        spins += 1
    return {"spins": spins}


@job("allocate")
async def allocate(ctx: Any) -> dict[str, Any]:
    """Hold ``data.mb`` MiB of written (so resident) memory for ``data.hold`` seconds."""
    block = b"\x01" * (int(ctx.job.data["mb"]) * 1024 * 1024)
    await trio.sleep(float(ctx.job.data.get("hold", 0.5)))
    del block
    return {"held_mb": ctx.job.data["mb"]}


@job("pidSleep")
async def pid_sleep(ctx: Any) -> None:
    """Write this process's pid to ``data.pid_file``, then sleep ``data.seconds`` (60)."""
    await trio.Path(ctx.job.data["pid_file"]).write_text(f"{os.getpid()}\n")
    await trio.sleep(float(ctx.job.data.get("seconds", 60)))


@job("merge")
async def merge(ctx: Any) -> dict[str, Any]:
    """A dependent: records its run, and returns what it read of its parents' results."""
    await ctx.db.execute(
        "INSERT INTO test_runs (job_id, worker_id) VALUES (%s, %s)", (ctx.job.id, ctx.worker_id)
    )
    parents = await ctx.parents()
    values = [r.get("v") if isinstance(r, dict) else None for r in parents.values()]
    return {
        "n": len(parents),
        "values": sorted(v for v in values if v is not None),
        "parents": {str(k): v for k, v in parents.items()},
    }


@job("flaky")
async def flaky(ctx: Any) -> dict[str, Any]:
    """Fails on its first attempt, succeeds on the next."""
    if ctx.job.attempt < 2:
        raise RuntimeError("first attempt fails")
    return {"v": ctx.job.data.get("v"), "attempt": ctx.job.attempt}


@job("tally")
async def tally(ctx: Any) -> dict[str, Any]:
    """A parent: records which worker ran it; returns its ``v``."""
    await ctx.db.execute(
        "INSERT INTO test_runs (job_id, worker_id) VALUES (%s, %s)", (ctx.job.id, ctx.worker_id)
    )
    return {"v": ctx.job.data.get("v")}
