"""The ``qdworker`` command line (``python -m qdworker``).

Subcommands (``run`` when none is given)::

    run                    the supervisor: workers, websocket server; SIGINT/SIGTERM stop it
    migrate                apply migrations (starts the embedded Postgres if needed)
    db url                 print the database URL (DATABASE_URL, or the running embedded server)
    db psql [ARGS...]      psql on the database (starts the embedded Postgres if needed)
    cancel ID [--reason R] cancel a job; prints cancelled / cancelling / finished / not_found
    status                 jobs by status, queues, workers, cron schedules (--json)
    queue ACTION           queues: list; pause / resume / reset NAME; set NAME --concurrency N
                           --key-concurrency N --rate N/PERIOD --fair --weight KEY=W
    jobs --dead [FILTERS]  dead jobs (failed for good), the latest death first
    retry ID [ID ...]      redrive dead jobs; prints old id -> new id, and what was skipped
    retry --dead [FILTERS] redrive the dead jobs matching FILTERS (--type, --queue,
                           --error-type, --since, --until, --limit)
    token --user N         mint a websocket token
    bench                  qdworker's own benchmark

Every setting of :data:`qdworker._config.SETTINGS` is a flag of every subcommand (and of the
bare command); a flag overrides its environment variable.

Exit codes: 0 success; 1 a command failed (one ``qdworker: error: ...`` line on stderr);
2 invalid usage or setting (one line naming the flag or variable and the accepted values);
130 interrupted.

Each subcommand is a :class:`~._command.Command` declared in a module of this package (or of
the benchmark); :data:`COMMANDS` lists them, in ``--help`` order: adding one is a module and a
line there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Final

from .. import _config as config_module
from .. import _logs as logs
from .._benchmark.cli import COMMAND as BENCH
from .._logs import module_logger
from ..errors import ConfigError, QdworkerError
from . import _db, _dead, _jobs, _queue, _run, _status, _token
from ._command import PROG, ArgumentParser, Command, fail, load_config, settings_parser

logger = module_logger(__name__)

#: The subcommands, in ``--help`` order; the first is the default.
COMMANDS: Final[dict[str, Command]] = {
    c.name: c
    for c in (
        _run.COMMAND, _db.MIGRATE, _db.DB, _jobs.CANCEL, _status.STATUS, _dead.JOBS, _dead.RETRY,
        _queue.COMMAND, _token.COMMAND, BENCH,
    )
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The full parser: settings flags on the bare command and on every subcommand."""
    settings = settings_parser()
    parser = ArgumentParser(
        prog=PROG,
        description="qdworker: a Postgres-backed background job worker. "
        "Without a subcommand, 'run' is assumed.",
        epilog="Environment only (no flag, so it never shows in `ps`): "
        + "; ".join(f"{s.env}: {s.help}" for s in config_module.SETTINGS if not s.flag_allowed),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[settings],
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=ArgumentParser
    )
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, parents=[settings])
        assert isinstance(child, ArgumentParser)
        command.add_arguments(child)
    return parser


def _leaf(exc: BaseException) -> BaseException:
    """The first QdworkerError/OSError inside (nested) exception groups, else ``exc``."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _leaf(inner)
            if isinstance(found, QdworkerError | OSError):
                return found
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        return fail(str(exc), 2)
    command = COMMANDS[args.command or "run"]
    logs.setup(config.log_level, config.log_format)
    try:
        return command.handler(args, config)
    except ConfigError as exc:
        return fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, ConfigError):
            return fail(str(leaf), 2)
        if isinstance(leaf, QdworkerError | OSError):
            logger.debug("command failed", exc_info=exc)
            return fail(str(leaf))
        raise


if __name__ == "__main__":
    sys.exit(main())
