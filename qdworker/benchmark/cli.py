"""The ``bench`` subcommand (:data:`COMMAND`, listed by :mod:`qdworker.cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..cli._command import Command
from ..config import Config
from .workloads import ALL_WORKLOADS, Bench, Options, dumps, render_table

__all__ = ["COMMAND", "add_arguments", "handler"]


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o = Options()
    parser.add_argument("--json", action="store_true", help="print one JSON object per figure")
    parser.add_argument(
        "--n",
        type=_positive_int,
        default=o.n,
        help=f"jobs per drain / batch enqueue / cost run (default {o.n})",
    )
    parser.add_argument(
        "--n-enqueue",
        type=_positive_int,
        default=o.n_enqueue,
        help=f"single submit_job calls of 'enqueue' (default {o.n_enqueue})",
    )
    parser.add_argument(
        "--wakeup-n",
        type=_positive_int,
        default=o.wakeup_n,
        help=f"inserts of 'wakeup', 50 ms apart (default {o.wakeup_n})",
    )
    parser.add_argument(
        "--steady-rate",
        type=float,
        default=o.steady_rate,
        help=f"inserts per second of 'steady' (default {o.steady_rate:g})",
    )
    parser.add_argument(
        "--steady-seconds",
        type=float,
        default=o.steady_seconds,
        help=f"duration of 'steady' (default {o.steady_seconds:g})",
    )
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
        n=args.n,
        n_enqueue=args.n_enqueue,
        wakeup_n=args.wakeup_n,
        steady_rate=args.steady_rate,
        steady_seconds=args.steady_seconds,
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
