"""The worker child process: ``python -m qdworker._worker`` (started by the supervisor).

It reads the same configuration as the supervisor (environment), its id from
``QDWORKER_WORKER_ID``, its supervisor's from ``QDWORKER_SUPERVISOR_ID`` and its IPC socket
from the fd in ``QDWORKER_IPC_FD``, imports the job modules, and runs
:class:`~.worker.Worker` until told to stop (see there). Database outages never end it: it
waits them out.

Exit statuses: 0 after a stop; :data:`EXIT_STARTUP` when it cannot start (a bad setting or job
module: the line before says which, and the supervisor is told over IPC);
:data:`~.leases.EXIT_STUCK` when a handler blocks the process past its timeout;
:data:`~.leases.EXIT_LEASE_LOST` when a handler that cannot be stopped would outlive its lease.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from typing import Final, NoReturn

import trio

from .. import _config as config_module
from .. import _logs as logs
from .. import _protocol as protocol
from .. import _registry as registry
from .._logs import module_logger
from .._redact import redact
from ..errors import QdworkerError
from .outbox import Outbox
from .worker import Worker

logger = module_logger(__name__)

EXIT_STARTUP: Final = 2


def _report(message: str) -> NoReturn:
    """Tell the supervisor why this process cannot start (best effort), then exit."""
    if protocol.DEFAULT_IPC_FD_ENV_VAR in os.environ:

        async def send() -> None:
            with trio.move_on_after(1.0):
                stream = protocol.child_stream_from_env()
                async with stream:
                    await protocol.send(stream, protocol.worker_error(message))

        try:
            trio.run(send)
        except Exception:
            logger.debug("could not report the start-up error", exc_info=True)
    sys.exit(EXIT_STARTUP)


def _slot_from_env() -> tuple[int | None, int]:
    """This process's slot in its supervisor and how often the slot was restarted
    (``QDWORKER_WORKER_SLOT``, ``QDWORKER_WORKER_RESTARTS``; None and 0 when missing)."""
    try:
        slot = int(os.environ["QDWORKER_WORKER_SLOT"])
    except (KeyError, ValueError):
        slot = None
    try:
        restarts = max(0, int(os.environ.get("QDWORKER_WORKER_RESTARTS", "0")))
    except ValueError:
        restarts = 0
    return slot, restarts


def main() -> None:
    """Entry point of a worker child. Exits with the worker's status."""
    worker_id = os.environ.get("QDWORKER_WORKER_ID") or (
        f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    )
    try:
        cfg = config_module.load()
    except QdworkerError as exc:
        print(f"qdworker worker: {exc}", file=sys.stderr)
        _report(str(exc))
    logs.setup(cfg.worker_log_level, cfg.log_format, worker_id)
    if not cfg.database_url:
        logger.error("DATABASE_URL is not set (the supervisor passes it to its workers)")
        _report("DATABASE_URL is not set")
    modules = ",".join(cfg.jobs) or "(none)"
    try:
        from .._jobs import builtin  # noqa: F401  (registers the built-in job types)

        registry.import_modules(cfg.jobs)
    except QdworkerError as exc:  # e.g. a job module's own settings are invalid
        logger.error("cannot load job modules %s: %s", modules, exc)  # noqa: TRY400 (one line)
        _report(f"cannot load job modules {modules} (QDWORKER_JOBS): {exc}")
    except Exception as exc:
        logger.exception("cannot import job modules %s", modules)
        _report(f"cannot import job modules {modules} (QDWORKER_JOBS): {exc!r}")
    url = cfg.database_url
    assert url is not None

    async def open_and_run() -> int:
        # Without a supervisor (no IPC fd: tests, debugging) events go nowhere.
        with_ipc = protocol.DEFAULT_IPC_FD_ENV_VAR in os.environ
        outbox = Outbox(protocol.child_stream_from_env() if with_ipc else None)
        supervisor = os.environ.get("QDWORKER_SUPERVISOR_ID") or None
        slot, restarts = _slot_from_env()
        return await Worker(
            cfg, worker_id, url, outbox, supervisor_id=supervisor, slot=slot, restarts=restarts
        ).run()

    try:
        code = trio.run(open_and_run)
    except Exception:
        logger.exception("worker %s failed (database %s)", worker_id, redact(url))
        code = EXIT_STARTUP
    sys.exit(code)
