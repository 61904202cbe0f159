"""``python -m qdworker [run]``: the supervisor, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable
from typing import Any

import trio

from .._config import Config
from .._supervisor.main import Manager, serve
from ._command import Command, no_arguments

logger = logging.getLogger("qdworker.cli")


class _Signals:
    """First SIGINT/SIGTERM: graceful shutdown; second: immediate; during start-up: abort."""

    def __init__(self, cancel_scope: trio.CancelScope) -> None:
        self.cancel_scope = cancel_scope
        self.manager: Manager | None = None
        self.count = 0

    async def watch(self, receiver: Any) -> None:
        async for signum in receiver:
            self.count += 1
            name = signal.Signals(signum).name
            if self.manager is None:
                logger.info("%s during start-up: stopping", name)
                self.cancel_scope.cancel()
            elif self.count == 1:
                logger.info(
                    "%s: shutting down gracefully (running jobs get %g s); send it again to "
                    "cancel them at once",
                    name,
                    self.manager.config.shutdown_timeout,
                )
                self.manager.request_shutdown()
            else:
                logger.warning("%s again: cancelling running jobs now", name)
                self.manager.request_shutdown(immediate=True)


async def run_supervisor(config: Config, **serve_options: Any) -> None:
    """Run :func:`~qdworker._supervisor.main.serve` until SIGINT/SIGTERM (see :class:`_Signals`);
    returns once everything stopped. ``serve_options`` go to ``serve`` (tests)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        async with trio.open_nursery() as nursery:
            signals = _Signals(nursery.cancel_scope)
            nursery.start_soon(signals.watch, receiver)
            async with trio.open_nursery() as inner:
                signals.manager = await inner.start(_serve_with(config, serve_options))
            nursery.cancel_scope.cancel()


def _serve_with(config: Config, options: dict[str, Any]) -> Callable[..., Any]:
    async def run(*, task_status: trio.TaskStatus[Manager] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(config, task_status=task_status, **options)

    return run


def _run(args: argparse.Namespace, config: Config) -> int:
    del args
    trio.run(run_supervisor, config)
    return 0


COMMAND = Command("run", "run the supervisor (default)", no_arguments, _run)
