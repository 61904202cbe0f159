"""Numbered pure-SQL migrations, applied in order under an advisory lock.

``sql/migrations/NNNN_name.sql`` files are applied in number order, each in its own
transaction, and recorded in ``qdworker_migrations``. A session-level advisory lock serialises
concurrent migrators (two supervisors starting at once): the second waits, then finds nothing
left to do. Applying is idempotent; a recorded migration whose file is gone, or a database
newer than this code, raises :class:`~qdworker.errors.MigrationError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from .._logs import module_logger
from ..errors import MigrationError
from . import statements
from .connection import Connection

logger = module_logger(__name__)

#: Advisory lock key (``pg_advisory_lock(bigint)``) held while migrating.
MIGRATION_LOCK_KEY = 7_151_978_420_011

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def available(folder: Path | None = None) -> list[Migration]:
    """The migration files, in version order. Raises on gaps or malformed names."""
    folder = folder or statements.migrations_dir()
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match is None:
            raise MigrationError(f"migration file name {path.name!r} is not NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration {expected:04d} is missing before {migration.path.name}"
            )
    return found


def _apply(conn: psycopg.Connection[dict[str, Any]], migrations: list[Migration]) -> list[int]:
    applied_now: list[int] = []
    conn.execute(statements.get("migrations_lock"), {"key": MIGRATION_LOCK_KEY})
    try:
        conn.execute(statements.get("migrations_table"))
        done = {row["version"] for row in conn.execute(statements.get("migrations_applied"))}
        known = {m.version for m in migrations}
        newer = sorted(done - known)
        if newer:
            raise MigrationError(
                f"the database has migrations {newer} that this qdworker does not know: "
                "it is older than the schema; upgrade qdworker"
            )
        for migration in migrations:
            if migration.version in done:
                continue
            logger.info("applying migration %04d_%s", migration.version, migration.name)
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute(
                    statements.get("migrations_record"),
                    {"version": migration.version, "name": migration.name},
                )
            applied_now.append(migration.version)
    finally:
        conn.execute(statements.get("migrations_unlock"), {"key": MIGRATION_LOCK_KEY})
    return applied_now


async def apply(conn: Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Bring the schema up to date on ``conn`` (autocommit). Returns the versions applied now."""
    todo = available() if migrations is None else migrations
    try:
        return await conn.run(lambda raw: _apply(raw, todo))
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(f"migration failed: {exc}") from exc
