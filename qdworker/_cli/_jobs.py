"""``cancel ID``: cancel a job from the command line (``status`` is in :mod:`._status`)."""

from __future__ import annotations

import argparse

import trio

from .._client import Queue
from .._config import Config
from .._supervisor.main import embedded_database
from ._command import Command


def _add_cancel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", type=int, metavar="ID", help="the job's id")
    parser.add_argument("--reason", help="stored in the job's result")


async def _cancel(config: Config, job_id: int, reason: str | None) -> str:
    async with embedded_database(config) as url, Queue(url) as queue:
        return await queue.cancel_job(job_id, reason)


def _cancel_command(args: argparse.Namespace, config: Config) -> int:
    outcome = trio.run(_cancel, config, args.job_id, args.reason)
    print(outcome)
    return 1 if outcome == "not_found" else 0


CANCEL = Command("cancel", "cancel a job", _add_cancel, _cancel_command)
