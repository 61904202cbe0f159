"""What every supervisor does once the schema is up to date: ensure the cron jobs and run the
start-up work that job modules declare (:func:`qdworker._registry.cron`,
:func:`qdworker._registry.on_startup`).

The job modules are the ones the workers load (``QDWORKER_JOBS``) plus the built-in ones; the
supervisor imports them too, only to read their declarations, and names none itself. A module
that raises :class:`~qdworker.errors.QdworkerError` (its settings are invalid) stops start-up
with that one line; one that fails to import otherwise is logged, and start-up goes on (its
workers will report the same error when they load it).

Ensuring a cron job is idempotent and safe from many supervisors at once: each chain's tag is
locked while it is checked, and a row is inserted only if the chain has no unfinished row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Final

from .. import _registry as registry
from .._db import store
from .._db.connection import Connection
from .._logs import module_logger
from .._registry import CronJob
from ..errors import QdworkerError

logger = module_logger(__name__)


#: Job modules every worker loads, whatever ``QDWORKER_JOBS`` says.
BUILTIN_MODULES: Final = ("qdworker._jobs.builtin",)


def load_job_modules(modules: Sequence[str]) -> tuple[str, ...]:
    """Import the built-in job modules and ``modules`` for their declarations (see the
    module docstring for errors); returns the names of all of them."""
    registry.import_modules(BUILTIN_MODULES)
    for module in modules:
        try:
            registry.import_modules([module])
        except QdworkerError:
            raise
        except Exception as exc:
            logger.error(  # noqa: TRY400 (one line; the workers log the traceback)
                "cannot import job module %s (QDWORKER_JOBS): %r; its start-up jobs are not "
                "ensured",
                module,
                exc,
            )
    return (*BUILTIN_MODULES, *modules)


async def ensure_cron_jobs(conn: Connection, jobs: Iterable[CronJob], timezone: str) -> list[int]:
    """Insert each cron job unless its chain already has an unfinished row. Returns the new
    rows' ids."""
    created: list[int] = []
    for cron_job in jobs:
        job_id = await conn.run(
            partial(store.ensure_cron_job, cron_job=cron_job, timezone=timezone)
        )
        if job_id is not None:
            created.append(job_id)
            logger.info("scheduled %s (%s) as job %d", cron_job.type, cron_job.schedule, job_id)
    return created


async def ensure_startup_jobs(conn: Connection, modules: Sequence[str], timezone: str) -> list[int]:
    """Ensure every cron job ``modules`` declare, then run their start-up hooks."""
    created = await ensure_cron_jobs(conn, registry.cron_jobs(modules), timezone)
    for hook in registry.startup_hooks(modules):
        await hook(conn, timezone)
    return created
