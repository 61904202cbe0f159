"""Cron schedules: QuickDapp's 6-field form (seconds first) and the standard 5-field form.

``*/30 * * * * *`` runs every 30 seconds (QuickDapp); ``0 * * * *`` at the start of every hour.
croniter reads a 6th field as *seconds last* unless told otherwise, so every call here passes
``second_at_beginning=True``.

Ticks are computed in a time zone (UTC unless ``QDWORKER_TIMEZONE`` says otherwise; QuickDapp
silently used the process's local zone). Daylight-saving rules, for zones that have them:

* a local time that happens twice (autumn) fires once, at its first occurrence, when the
  schedule names its hours; an every-hour schedule (``*`` in the hour field) fires in both
  occurrences, since they are an hour apart in real time;
* a local time that never happens (spring) fires at the first instant after the gap.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, datetime

from croniter import croniter

#: Bound on ticks examined when skipping the past (after long downtime of a per-second job).
MAX_TICKS_SKIPPED = 100_000


def validate(schedule: str) -> str:
    """Return ``schedule`` normalised, or raise ``ValueError`` saying why it is invalid."""
    text = " ".join(schedule.split())
    fields = text.split(" ")
    if len(fields) not in (5, 6):
        raise ValueError(
            f"cron schedule {schedule!r} has {len(fields)} fields: expected 5 "
            "(minute hour day month weekday) or 6 (second first, as QuickDapp)"
        )
    if not croniter.is_valid(text, second_at_beginning=True):
        raise ValueError(f"cron schedule {schedule!r} is not a valid cron expression")
    return text


def is_valid(schedule: str) -> bool:
    try:
        validate(schedule)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def _fixed_hours(schedule: str) -> bool:
    fields = schedule.split(" ")
    hour = fields[2] if len(fields) == 6 else fields[1]
    return hour != "*"


def next_tick(schedule: str, scheduled: datetime, now: datetime, tz: str = "UTC") -> datetime:
    """The first tick of ``schedule`` strictly after both ``scheduled`` and ``now``, in UTC.

    ``scheduled`` is the due time of the run that just finished: counting from it (not from
    when the run ended) means no drift; requiring the tick to be after ``now`` skips the ticks
    missed during downtime instead of piling them up. Raises ``ValueError`` for an invalid
    schedule or one with no tick in :data:`MAX_TICKS_SKIPPED` steps.
    """
    text = validate(schedule)
    zone = _zone(tz)
    start = max(scheduled, now).astimezone(zone)
    it = croniter(text, start, second_at_beginning=True)
    skip_repeats = _fixed_hours(text)
    for _ in range(MAX_TICKS_SKIPPED):
        tick: datetime = it.get_next(datetime)
        if skip_repeats and tick.fold == 1 and _is_ambiguous(tick):
            continue
        tick_utc = tick.astimezone(UTC)
        if tick_utc > now and tick_utc > scheduled:
            return tick_utc
    raise ValueError(f"cron schedule {schedule!r} has no tick after {now.isoformat()}")


def _is_ambiguous(local: datetime) -> bool:
    """True if ``local``'s wall time also exists with the other ``fold`` (a repeated hour)."""
    other = local.replace(fold=1 - local.fold)
    return other.utcoffset() != local.utcoffset()
