"""The progress statement (``write_progress`` in ``sql/queries/progress.sql``).

Blocks: call it through :meth:`.connection.Link.run`. Errors are psycopg's; the caller's
connection layer translates them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from psycopg.rows import tuple_row

from . import statements
from .store import Raw, int_array


def write_progress(
    raw: Raw, *, owner: str, entries: Sequence[tuple[int, int, Mapping[str, Any]]]
) -> set[int]:
    """Store ``(job_id, claims, progress)`` for each entry whose run still holds its row
    (leased to ``owner`` under that claim, not finished); the ids written."""
    if not entries:
        return set()
    params = {
        "owner": owner,
        "ids": int_array(entry[0] for entry in entries),
        "claims": int_array(entry[1] for entry in entries),
        "values": json.dumps([entry[2] for entry in entries], allow_nan=False),
    }
    with raw.cursor(row_factory=tuple_row) as cur:
        cur.execute(statements.get("write_progress"), params)
        return {row[0] for row in cur.fetchall()}
