"""Every SQL statement qdworker runs, by name, loaded from ``sql/queries/*.sql``.

A query file holds blocks introduced by ``-- name: <name>``; the text up to the next such line
is the statement (psycopg ``%(param)s`` placeholders). Statements are never built from user
strings. The ``sql`` folder is ``<repo>/sql`` in a checkout and ``qdworker/_sql`` in a wheel.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path

_NAME_RE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@functools.cache
def sql_dir() -> Path:
    """The folder holding ``migrations/`` and ``queries/``."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_sql", here.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise FileNotFoundError(f"qdworker's sql folder is missing (looked in {here / '_sql'})")


def migrations_dir() -> Path:
    return sql_dir() / "migrations"


@functools.cache
def queries() -> Mapping[str, str]:
    """All named statements. Raises ``ValueError`` on a duplicate name."""
    found: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        matches = list(_NAME_RE.finditer(text))
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            name = match.group(1)
            if name in found:
                raise ValueError(f"statement {name!r} is defined twice (last in {path.name})")
            found[name] = text[match.end() : end].strip().rstrip(";")
    return found


def get(name: str) -> str:
    """The statement called ``name``; ``KeyError`` if there is none."""
    return queries()[name]
