"""Queue settings and state for the client API and the command line (private).

:func:`settings_changes` checks the keyword arguments of :meth:`qdworker.Queue.set_queue`
and turns them into the JSON object the ``set_queue`` statement applies (only the settings
given change; ``None`` clears a limit). :func:`set_queue`, :func:`reset_queue` and
:func:`list_queues` run the statements of ``sql/queries/queues.sql`` on a connection.
Invalid input raises :class:`~qdworker.errors.InvalidQueueError` before anything is written;
database errors are the caller's connection's (translated by it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import psycopg

from ._db import statements
from .errors import InvalidQueueError

Raw = psycopg.Connection[Any]

#: Longest queue name (the CHECK constraint agrees).
MAX_NAME_CHARS: Final = 255
#: Most job starts a rate limit allows per period (the CHECK constraint agrees).
MAX_RATE_LIMIT: Final = 100_000
#: Longest rate period: a day, in milliseconds.
MAX_RATE_PERIOD_MS: Final = 86_400_000
#: Most keys with a weight.
MAX_WEIGHTS: Final = 10_000


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """One queue: its settings (the defaults when it has none) and what it holds now."""

    name: str
    paused: bool
    concurrency: int | None  # running jobs of the queue, cluster-wide (None: no limit)
    key_concurrency: int | None  # running jobs per concurrency_key (None: no limit)
    rate_limit: int | None  # job starts per rate_period_ms (None: no limit)
    rate_period_ms: int
    fair: bool  # capacity shared between concurrency keys
    key_weights: dict[str, float]  # a key's share under fair (others: 1)
    due: int  # pending jobs that may start now
    scheduled: int  # pending jobs due later
    running: int
    oldest_due_seconds: float | None  # how long the oldest due job has waited


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise InvalidQueueError(
            f"a queue name is a non-empty string of at most {MAX_NAME_CHARS} characters"
        )
    return name


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidQueueError(f"{key} must be true or false")
    return value


def _limit(key: str, value: Any, most: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidQueueError(f"{key} must be an integer >= 1, or None for no limit")
    if most is not None and value > most:
        raise InvalidQueueError(f"{key} must be at most {most}")
    return value


def _period(key: str, value: Any) -> int:
    checked = _limit(key, value, MAX_RATE_PERIOD_MS)
    if checked is None:
        raise InvalidQueueError(f"{key} must be an integer from 1 to {MAX_RATE_PERIOD_MS}")
    return checked


def _weights(key: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping) or len(value) > MAX_WEIGHTS:
        raise InvalidQueueError(f"{key} must map at most {MAX_WEIGHTS} keys to weights")
    for k, w in value.items():
        if not isinstance(k, str) or isinstance(w, bool) or not isinstance(w, int | float):
            raise InvalidQueueError(f"{key} maps concurrency keys (strings) to numbers")
        if not (math.isfinite(w) and w > 0):
            raise InvalidQueueError(f"{key}: the weight of {k!r} must be a number > 0")
    return {str(k): float(w) for k, w in value.items()}


_CHECKS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "paused": _flag,
    "concurrency": _limit,
    "key_concurrency": _limit,
    "rate_limit": lambda key, value: _limit(key, value, MAX_RATE_LIMIT),
    "rate_period_ms": _period,
    "fair": _flag,
    "key_weights": _weights,
}
#: The settings :meth:`qdworker.Queue.set_queue` takes, as in ``worker_queues``.
SETTINGS: Final = tuple(_CHECKS)


def settings_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` checked (see the module docstring); raises InvalidQueueError naming the
    first bad one."""
    unknown = set(changes) - set(_CHECKS)
    if unknown:
        raise InvalidQueueError(
            f"unknown queue setting(s) {sorted(unknown)}; accepted: {', '.join(SETTINGS)}"
        )
    return {key: _CHECKS[key](key, value) for key, value in changes.items()}


def _info(row: Mapping[str, Any]) -> QueueInfo:
    return QueueInfo(**{name: row[name] for name in QueueInfo.__slots__})


def set_queue(raw: Raw, name: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Apply checked ``changes`` to queue ``name``; return its settings row."""
    params = {"name": name, "changes": json.dumps(changes)}
    row = raw.execute(statements.get("set_queue"), params).fetchone()
    assert row is not None
    return cast(dict[str, Any], row)


def reset_queue(raw: Raw, name: str) -> bool:
    """Forget queue ``name``'s settings; whether it had any."""
    row = raw.execute(statements.get("reset_queue"), {"name": name}).fetchone()
    assert row is not None
    return bool(cast(dict[str, Any], row)["n"])


def list_queues(raw: Raw) -> list[QueueInfo]:
    """Every queue with settings or unfinished jobs, by name."""
    rows = raw.execute(statements.get("list_queues")).fetchall()
    return [_info(cast(dict[str, Any], row)) for row in rows]
