"""Housekeeping every supervisor does for the whole cluster, every :data:`MAINTENANCE_SECONDS`
(or a quarter of ``QDWORKER_UNKNOWN_TYPE_TIMEOUT`` when that is shorter, at least
:data:`MIN_INTERVAL_SECONDS`): fail jobs of types no live worker runs, forget long-gone workers,
delete throughput buckets older than :data:`KEEP_THROUGHPUT_SECONDS`.

Unknown job types: workers claim only the types they registered (``qdworker_workers``), so a
job whose type nobody runs stays pending (a rolling deploy: the new type waits for the new
workers). Once it has waited ``QDWORKER_UNKNOWN_TYPE_TIMEOUT`` seconds since it was due *and*
since a worker running its type was last seen, while some worker is alive to judge, it fails
once with ``UnknownJobType`` and is not retried. Several supervisors may do this at once: rows
are locked with ``SKIP LOCKED``.

Errors are logged and retried at the next round; a database outage is logged once, by the
connection layer.
"""

from __future__ import annotations

from functools import partial
from typing import Final

import trio

from .._db import _metrics as metrics_store
from .._db import store
from .._db.connect import DbOptions
from .._db.connection import Link
from .._logs import module_logger
from ..errors import DatabaseError

logger = module_logger(__name__)

MAINTENANCE_SECONDS: Final = 15.0
MIN_INTERVAL_SECONDS: Final = 0.25
#: Rows failed per statement (and per type per round).
FAIL_BATCH: Final = 1000
#: Registrations of workers not seen for this long are deleted (their types stop counting
#: as recently known).
FORGET_WORKERS_SECONDS: Final = 24 * 3600.0
#: ``qdworker_throughput`` keeps this much history (the dashboard shows the last 24 h).
KEEP_THROUGHPUT_SECONDS: Final = 25 * 3600.0


async def _round(link: Link, unknown_type_timeout: float) -> None:
    conn = await link.connection()
    for job_type, last_seen in await conn.run(store.unknown_types):
        fail = partial(
            store.fail_unknown_type,
            job_type=job_type,
            last_seen=last_seen,
            limit_seconds=unknown_type_timeout,
            batch=FAIL_BATCH,
        )
        failed = await conn.run(fail)
        if failed:
            logger.warning(
                "failed %d job(s) of type %r: no live worker runs that type (waited more than "
                "%g s); add its module to QDWORKER_JOBS",
                failed,
                job_type,
                unknown_type_timeout,
            )
    await conn.run(lambda raw: store.forget_workers(raw, older_than_seconds=FORGET_WORKERS_SECONDS))
    await conn.run(
        lambda raw: metrics_store.forget_throughput(raw, older_than_seconds=KEEP_THROUGHPUT_SECONDS)
    )


async def run_maintenance(
    url: str,
    options: DbOptions,
    *,
    unknown_type_timeout: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Do the housekeeping until cancelled (see the module docstring); never raises."""
    interval = max(MIN_INTERVAL_SECONDS, min(MAINTENANCE_SECONDS, unknown_type_timeout / 4))
    task_status.started()
    async with Link(url, "maintenance", options) as link:
        while True:
            try:
                await _round(link, unknown_type_timeout)
            except DatabaseError as exc:
                logger.debug("maintenance failed (%s); next round in %g s", exc, interval)
            await trio.sleep(interval)
