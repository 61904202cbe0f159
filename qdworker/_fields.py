"""What callers give the API, checked before anything is written (private): the fields of a
job (:func:`prepare_job`) and the filters of dead-job listing and redrive
(:func:`dead_filters`). Every check raises :class:`~qdworker.errors.InvalidJobError` naming
the first bad value; nothing here touches the database.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from ._model import USER_FIELDS
from ._schedule import backoff as backoff_rules
from ._schedule import cron
from .errors import InvalidJobError

#: Longest tag, type, queue, concurrency key and cron schedule (the CHECK constraints agree).
MAX_NAME_CHARS = 255
#: Largest priority either way (the CHECK constraint agrees); one step is a minute of waiting.
MAX_PRIORITY = 1_000_000
#: Largest ``data`` accepted through the API, as JSON.
MAX_DATA_BYTES = 1024 * 1024
#: Most jobs in one ``submit_jobs`` call (one statement).
MAX_BATCH = 100_000
#: Most parents one job may name in ``depends_on`` (as many as a batch, for its ``then`` job).
MAX_PARENTS = MAX_BATCH
#: What a parent that fails for good does to its dependents (``on_parent_failure``).
PARENT_FAILURE_MODES = ("cancel", "run")
#: What an insert does to the unfinished jobs of its tag (``on_tag_conflict``).
TAG_CONFLICT_MODES = ("replace", "keep")
#: Most dead jobs one ``dead_jobs`` call lists.
MAX_DEAD_LIST = 10_000
#: Most dead jobs one ``retry_dead`` call redrives (``qdworker_retry_dead`` agrees).
MAX_RETRY_DEAD = 100_000


def prepare_job(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one job's fields; return the JSON-ready dict ``insert_jobs`` takes.

    Raises :class:`InvalidJobError` naming the first bad field. ``due`` may be an aware
    ``datetime`` (absolute), a ``timedelta`` or a number of seconds (relative to the database
    clock), or ``None`` (now).
    """
    unknown = set(fields) - set(USER_FIELDS)
    if unknown:
        raise InvalidJobError(
            f"unknown job field(s) {sorted(unknown)}; accepted: {', '.join(USER_FIELDS)}"
        )
    out: dict[str, Any] = {"type": _name("type", fields.get("type")), "data": _data(fields)}
    for key, check in _OPTIONAL_FIELDS.items():
        value = fields.get(key)
        if value is not None:
            out.update(check(key, value))
    return out


def _name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_CHARS:
        raise InvalidJobError(
            f"{key} must be a non-empty string of at most {MAX_NAME_CHARS} characters"
        )
    return value


def _data(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    data = fields.get("data")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidJobError(f"data must be a JSON object (a dict), not {type(data).__name__}")
    try:
        encoded = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidJobError(f"data is not JSON-serialisable: {exc}") from None
    if len(encoded) > MAX_DATA_BYTES:
        raise InvalidJobError(
            f"data is {len(encoded)} bytes as JSON; the limit is {MAX_DATA_BYTES}"
        )
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(key: str, value: Any) -> dict[str, Any]:
    return {key: _name(key, value)}


def _count(key: str, value: Any) -> dict[str, Any]:
    if not _is_int(value) or value < 0:
        raise InvalidJobError(f"{key} must be an integer >= 0")
    return {key: value}


def _flag(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, bool):
        raise InvalidJobError(f"{key} must be true or false")
    return {key: value}


def _due(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidJobError("due must be a timezone-aware datetime")
        return {"due": value.isoformat()}
    if isinstance(value, timedelta):
        return {"delay_ms": value.total_seconds() * 1000}
    if (_is_int(value) or isinstance(value, float)) and math.isfinite(value):
        return {"delay_ms": float(value) * 1000}
    raise InvalidJobError("due must be a datetime, a timedelta or a number of seconds")


def _cron_schedule(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, str):
        raise InvalidJobError("cron_schedule must be a string")
    try:
        return {key: cron.validate(value)}
    except ValueError as exc:
        raise InvalidJobError(str(exc)) from None


def _max_attempts(key: str, value: Any) -> dict[str, Any]:
    if not _is_int(value) or value < 1:
        raise InvalidJobError("max_attempts must be an integer >= 1 (or None: unlimited)")
    return {key: value}


def _backoff(key: str, value: Any) -> dict[str, Any]:
    if value not in backoff_rules.BACKOFFS:
        raise InvalidJobError(f"backoff must be one of {', '.join(backoff_rules.BACKOFFS)}")
    return {key: value}


def _priority(key: str, value: Any) -> dict[str, Any]:
    if not _is_int(value) or abs(value) > MAX_PRIORITY:
        raise InvalidJobError(f"priority must be an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}")
    return {key: value}


def _on_tag_conflict(key: str, value: Any) -> dict[str, Any]:
    if value not in TAG_CONFLICT_MODES:
        raise InvalidJobError(
            "on_tag_conflict must be 'replace' (cancel the pending job of the tag, the default) "
            "or 'keep' (keep the pending or running job of the tag and insert nothing)"
        )
    return {key: value}


def _timeout(key: str, value: Any) -> dict[str, Any]:
    if not (_is_int(value) or isinstance(value, float)) or not value > 0:
        raise InvalidJobError("timeout_seconds must be a number > 0")
    return {key: float(value)}


def _depends_on(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidJobError("depends_on must be a list of job ids")
    ids = list(value)
    if not all(_is_int(i) and i > 0 for i in ids):
        raise InvalidJobError("depends_on must hold job ids (integers > 0)")
    if len(ids) > MAX_PARENTS:
        raise InvalidJobError(f"depends_on names {len(ids)} jobs; the limit is {MAX_PARENTS}")
    return {key: ids} if ids else {}


def _on_parent_failure(key: str, value: Any) -> dict[str, Any]:
    if value not in PARENT_FAILURE_MODES:
        raise InvalidJobError(f"on_parent_failure must be one of {PARENT_FAILURE_MODES}")
    return {key: value}


#: How each optional field is checked (``None`` means "not given"), in the order reported.
_OPTIONAL_FIELDS: dict[str, Callable[[str, Any], dict[str, Any]]] = {
    "tag": _text,
    "user_id": _count,
    "auto_reschedule_on_failure_delay": _count,
    "remove_delay": _count,
    "auto_reschedule_on_failure": _flag,
    "persistent": _flag,
    "due": _due,
    "cron_schedule": _cron_schedule,
    "max_attempts": _max_attempts,
    "backoff": _backoff,
    "timeout_seconds": _timeout,
    "queue": _text,
    "priority": _priority,
    "concurrency_key": _text,
    "on_tag_conflict": _on_tag_conflict,
    "depends_on": _depends_on,
    "on_parent_failure": _on_parent_failure,
}


def dead_filters(
    type: str | None,
    queue: str | None,
    error_type: str | None,
    since: datetime | None,
    until: datetime | None,
) -> dict[str, Any]:
    """The filters of dead-job listing and redrive, checked (``None``: any). Raises
    :class:`InvalidJobError` naming the first bad one."""
    filters = {"type": type, "queue": queue, "error_type": error_type}
    for key, value in filters.items():
        if value is not None:
            _name(key, value)
    for key, moment in (("since", since), ("until", until)):
        if moment is not None and (not isinstance(moment, datetime) or moment.tzinfo is None):
            raise InvalidJobError(f"{key} must be a timezone-aware datetime (or None)")
    return {**filters, "since": since, "until": until}


def check_limit(value: Any, maximum: int) -> int:
    if not _is_int(value) or not 1 <= value <= maximum:
        raise InvalidJobError(f"limit must be an integer from 1 to {maximum}")
    return int(value)
