"""``jobs --dead`` and ``retry``: dead jobs (failed for good) from the command line.

Listing and redriving by id go through :class:`~qdworker.Queue`. Redriving by filter calls the
SQL function ``qdworker_retry_dead`` through the store instead of ``Queue.retry_dead``: the
command reports the dead jobs it skipped too, which the API's list of new attempts does not
say. Filters are checked by the API's own :func:`~qdworker._fields.dead_filters`; a bad one is
a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import trio

from .._client import Queue
from .._config import Config
from .._db import store
from .._db.connect import DbOptions
from .._db.connection import connect
from .._fields import MAX_DEAD_LIST, MAX_RETRY_DEAD, dead_filters
from .._model import Job
from .._supervisor.main import embedded_database
from ..errors import InvalidJobError
from ._command import Command, fail

#: Most ids one ``retry`` takes.
MAX_RETRY_IDS: Final = 1000
#: Widest text shown in these columns of the listing (longer text ends in "…").
_WIDEST: Final = {"type": 32, "queue": 20, "error_type": 24, "error": 60}
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FILTERS: Final = ("type", "queue", "error_type", "since", "until")
Pairs = list[tuple[int, int | None]]


def moment(text: str) -> datetime:
    """An age (``45s``, ``30m``, ``2h``, ``7d``: that long ago by this machine's clock) or an
    ISO timestamp (UTC unless it names a zone). Raises ``argparse.ArgumentTypeError``."""
    match = _AGE.match(text.strip())
    try:
        if match:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            return datetime.now(UTC) - timedelta(seconds=seconds)
        parsed = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an age (30m, 2h, 7d) nor an ISO timestamp"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _limit(maximum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer from 1 to {maximum}")
        return value

    return parse


def _add_filters(parser: argparse.ArgumentParser, limit: int, maximum: int) -> None:
    parser.add_argument("--type", help="only jobs of this type")
    parser.add_argument("--queue", help="only jobs of this queue")
    parser.add_argument("--error-type", dest="error_type", help="only this result error_type")
    when = "an age (30m, 2h, 7d) or an ISO timestamp (UTC unless it names a zone)"
    parser.add_argument("--since", type=moment, metavar="AGE", help=f"died at or after: {when}")
    parser.add_argument("--until", type=moment, metavar="AGE", help=f"died before: {when}")
    parser.add_argument(
        "--limit", type=_limit(maximum), default=limit, metavar="N",
        help=f"at most N jobs (1 to {maximum}; default {limit})",
    )  # fmt: skip


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return dead_filters(*(getattr(args, name) for name in _FILTERS))


# --------------------------------------------------------------------------- jobs --dead


def _add_jobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dead", action="store_true", required=True,
        help="list dead jobs (failed for good), the latest death first",
    )  # fmt: skip
    _add_filters(parser, 100, MAX_DEAD_LIST)


async def _dead_jobs(config: Config, filters: dict[str, Any], limit: int) -> list[Job]:
    async with embedded_database(config) as url, Queue(url, db_timeout=config.db_timeout) as q:
        return await q.dead_jobs(**filters, limit=limit)


def _cut(text: str, column: str) -> str:
    text = " ".join(text.split())
    widest = _WIDEST[column]
    return text if len(text) <= widest else text[: widest - 1] + "…"


def _row(job: Job) -> tuple[str, ...]:
    result = job.result if isinstance(job.result, dict) else {}
    when = job.dead_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if job.dead_at else ""
    return (
        str(job.id), _cut(job.type, "type"), _cut(job.queue, "queue"), str(job.attempt), when,
        _cut(str(result.get("error_type", "")), "error_type"),
        _cut(str(result.get("error", "")), "error"),
    )  # fmt: skip


def table(jobs: Sequence[Job]) -> list[str]:
    """The listing's lines: a header, then one line per job (times in UTC)."""
    header = ("id", "type", "queue", "attempt", "dead since (UTC)", "error_type", "error")
    rows = [header, *(_row(job) for job in jobs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _jobs_command(args: argparse.Namespace, config: Config) -> int:
    try:
        filters = _filters(args)
    except InvalidJobError as exc:
        return fail(str(exc), 2)
    jobs = trio.run(_dead_jobs, config, filters, args.limit)
    if not jobs:
        print("no dead jobs")
        return 0
    print("\n".join(table(jobs)))
    more = (
        "; more may match (narrow the filters or raise --limit)" if len(jobs) == args.limit else ""
    )
    print(f"{len(jobs)} dead job(s){more}")
    return 0


# --------------------------------------------------------------------------- retry


def _add_retry(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_ids", type=int, nargs="*", metavar="ID", help="dead jobs to redrive")
    parser.add_argument(
        "--dead", action="store_true",
        help="redrive the dead jobs matching the filters instead, the oldest death first",
    )  # fmt: skip
    _add_filters(parser, 1000, MAX_RETRY_DEAD)


async def _retry_ids(config: Config, job_ids: Sequence[int]) -> Pairs:
    async with embedded_database(config) as url, Queue(url, db_timeout=config.db_timeout) as q:
        pairs: Pairs = []
        for job_id in job_ids:
            new = await q.retry_job(job_id)
            pairs.append((job_id, None if new is None else new.id))
        return pairs


async def _retry_dead(config: Config, filters: dict[str, Any], limit: int) -> Pairs:
    async with embedded_database(config) as url:
        conn = await connect(url, "retry", DbOptions(config.db_timeout))
        try:
            return await conn.run(lambda raw: store.retry_dead(raw, filters, limit))
        finally:
            await conn.aclose()


def _usage_problem(args: argparse.Namespace) -> str | None:
    if args.dead == bool(args.job_ids):
        return "give either job ids or --dead (with filters), not both nor neither"
    if args.job_ids and any(getattr(args, name) is not None for name in _FILTERS):
        return "filters apply only with --dead"
    if len(args.job_ids) > MAX_RETRY_IDS:
        return f"at most {MAX_RETRY_IDS} job ids at once (use --dead with filters for more)"
    return None


def _retry_command(args: argparse.Namespace, config: Config) -> int:
    problem = _usage_problem(args)
    if problem is not None:
        return fail(problem, 2)
    if args.job_ids:
        pairs = trio.run(_retry_ids, config, args.job_ids)
    else:
        try:
            filters = _filters(args)
        except InvalidJobError as exc:
            return fail(str(exc), 2)
        pairs = trio.run(_retry_dead, config, filters, args.limit)
    for old, new in pairs:
        print(f"{old} -> {new}" if new is not None else f"{old} skipped")
    skipped = sum(1 for _, new in pairs if new is None)
    print(f"redriven {len(pairs) - skipped}, skipped {skipped}"
          + (" (not dead, or another unfinished job has its tag)" if skipped else ""))  # fmt: skip
    return 1 if args.job_ids and skipped else 0


JOBS = Command("jobs", "list dead jobs (--dead) with filters", _add_jobs, _jobs_command)
RETRY = Command(
    "retry", "redrive dead jobs: by id, or --dead with filters", _add_retry, _retry_command
)
