"""``queue list|pause|resume|set|reset``: queue settings and depth from the command line."""

from __future__ import annotations

import argparse
import re
from typing import Any, Final

import trio

from .._client import Queue
from .._config import Config
from .._queues import QueueInfo
from .._supervisor.main import embedded_database
from ._command import Command

_PERIOD_UNITS_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_RATE = re.compile(r"^(\d+)(?:/(\d*)(ms|s|m|h))?$")


def _limit(text: str) -> int | None:
    """``N`` (a limit) or ``none`` (no limit)."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', not {text!r}") from None


def _rate(text: str) -> tuple[int | None, int | None]:
    """``10`` (per second), ``10/1s``, ``100/m``, ``5/500ms`` or ``none``: (limit, period ms)."""
    if text.lower() == "none":
        return None, None
    match = _RATE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected N, N/PERIOD (e.g. 10/1s) or none: {text!r}")
    count, amount, unit = match.groups()
    if unit is None:
        return int(count), 1000
    return int(count), int(amount or 1) * _PERIOD_UNITS_MS[unit]


def _weight(text: str) -> tuple[str, float]:
    key, sep, value = text.rpartition("=")
    try:
        return key, float(value) if sep else float("nan")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=WEIGHT, not {text!r}") from None


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="every queue: settings, due, scheduled, running, wait")
    for name, text in (("pause", "start no new jobs of the queue"),
                       ("resume", "start its jobs again"),
                       ("reset", "forget its settings (no limits, not paused)")):  # fmt: skip
        actions.add_parser(name, help=text).add_argument("name", metavar="NAME")
    change = actions.add_parser("set", help="change settings; the others stay",
                                argument_default=argparse.SUPPRESS)  # fmt: skip
    change.add_argument("name", metavar="NAME")
    # dest: the settings flags own "concurrency" (a worker's, QDWORKER_CONCURRENCY).
    change.add_argument("--concurrency", dest="queue_concurrency", type=_limit,
                        metavar="N|none", help="running jobs of the queue")  # fmt: skip
    change.add_argument("--key-concurrency", type=_limit, metavar="N|none",
                        help="running jobs per concurrency_key, cluster-wide")  # fmt: skip
    change.add_argument("--rate", type=_rate, metavar="N/PERIOD|none",
                        help="job starts per period, cluster-wide (10/1s, 600/m)")  # fmt: skip
    change.add_argument("--fair", action=argparse.BooleanOptionalAction,
                        help="share capacity round-robin between concurrency keys")  # fmt: skip
    change.add_argument("--weight", type=_weight, action="append", metavar="KEY=W",
                        help="a key's share under --fair (repeat; replaces them all)")  # fmt: skip


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given (absent flags are absent from ``args``: argument_default)."""
    given = vars(args)
    changes: dict[str, Any] = {k: given[k] for k in ("key_concurrency", "fair") if k in given}
    if "queue_concurrency" in given:
        changes["concurrency"] = given["queue_concurrency"]
    if "rate" in given:
        changes["rate_limit"], period = given["rate"]
        if period is not None:
            changes["rate_period_ms"] = period
    if "weight" in given:
        changes["key_weights"] = dict(given["weight"])
    return changes


def _row(info: QueueInfo) -> list[str]:
    limits = []
    if info.concurrency is not None:
        limits.append(f"concurrency={info.concurrency}")
    if info.key_concurrency is not None:
        limits.append(f"per-key={info.key_concurrency}")
    if info.rate_limit is not None:
        limits.append(f"rate={info.rate_limit}/{info.rate_period_ms}ms")
    if info.fair:
        limits.append("fair")
    wait = "-" if info.oldest_due_seconds is None else f"{info.oldest_due_seconds:.1f}s"
    return [info.name, "paused" if info.paused else "active", str(info.due),
            str(info.scheduled), str(info.running), wait, " ".join(limits) or "-"]  # fmt: skip


def _table(rows: list[list[str]]) -> str:
    head = ["queue", "state", "due", "scheduled", "running", "oldest wait", "limits"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [head, *rows])  # fmt: skip


async def _act(config: Config, args: argparse.Namespace) -> str:
    async with embedded_database(config) as url, Queue(url) as client:
        if args.action == "list":
            return _table([_row(info) for info in await client.list_queues()])
        if args.action == "reset":
            had = await client.reset_queue(args.name)
            return f"{args.name}: settings {'forgotten' if had else 'were the defaults already'}"
        if args.action in ("pause", "resume"):
            await client.set_queue(args.name, paused=args.action == "pause")
            return f"{args.name}: {'paused' if args.action == 'pause' else 'resumed'}"
        changes = _changes(args)
        if not changes:
            return f"{args.name}: nothing to change (see --help)"
        await client.set_queue(args.name, **changes)
        return f"{args.name}: " + ", ".join(f"{k}={v}" for k, v in changes.items())


def _handler(args: argparse.Namespace, config: Config) -> int:
    print(trio.run(_act, config, args))
    return 0


COMMAND: Final = Command(
    "queue", "list queues; pause, resume, limit them", _add_arguments, _handler
)
