"""The ``bench`` subcommand (:data:`COMMAND`, listed by :mod:`qdworker._cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._cli._command import Command
from .._config import Config
from ._figures import dumps
from .workloads import ALL_WORKLOADS, Bench, Options, render_table


def _workloads(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {','.join(ALL_WORKLOADS)}"
        )
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("expected an integer >= 1")
    return value


#: The sizing options: flag, parser, :class:`Options` field, help (``{}`` is the default).
_SIZES: tuple[tuple[str, Callable[[str], Any], str, str], ...] = (
    ("--n", _positive_int, "n", "jobs per drain / batch enqueue / cost run (default {})"),
    ("--n-enqueue", _positive_int, "n_enqueue", "submit_job calls of 'enqueue' (default {})"),
    ("--wakeup-n", _positive_int, "wakeup_n", "inserts of 'wakeup', 50 ms apart (default {})"),
    ("--steady-rate", float, "steady_rate", "inserts per second of 'steady' (default {:g})"),
    ("--steady-seconds", float, "steady_seconds", "duration of 'steady' (default {:g})"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Options()
    parser.add_argument("--json", action="store_true", help="print one JSON object per figure")
    for flag, parse, field, text in _SIZES:
        default = getattr(defaults, field)
        parser.add_argument(flag, type=parse, default=default, help=text.format(default))
    parser.add_argument(
        "--workloads",
        type=_workloads,
        default=ALL_WORKLOADS,
        help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} (default all)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=0,
        metavar="K",
        help="also drain N jobs with K websocket clients connected (e.g. 10)",
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help="cost: keep draining up to 100,000 jobs and report worker RSS growth",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep the supervisors' logs in this folder (default: discarded)",
    )


def handler(args: argparse.Namespace, config: Config) -> int:
    """Run the benchmark; the only setting read from ``config`` is ``database_url``."""
    if config.log_level != "debug":
        # The benchmark's own connections and the embedded server log at info; keep them quiet.
        logging.getLogger("qdworker").setLevel(logging.WARNING)
    options = Options(
        **{field: getattr(args, field) for _, _, field, _ in _SIZES},
        workloads=args.workloads,
        clients=args.clients,
        long=args.long,
        database_url=config.database_url,
        keep_logs=args.logs,
        progress=lambda text: print(f"bench: {text}", file=sys.stderr, flush=True),
    )
    figures = Bench(options).run()
    if args.json:
        for figure in figures:
            print(dumps(figure), flush=True)
    else:
        print(render_table(figures))
    return 0


COMMAND = Command(
    "bench",
    "measure drain, enqueue, wake-up, steady state, scaling and cost",
    add_arguments,
    handler,
)
