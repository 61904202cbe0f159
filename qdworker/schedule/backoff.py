"""Retry delays and attempt limits.

QuickDapp retries a failed job with ``auto_reschedule_on_failure`` forever, every
``auto_reschedule_on_failure_delay`` milliseconds: that stays the default (``backoff='fixed'``,
``max_attempts`` NULL). ``backoff='exponential'`` doubles the delay per attempt, capped at
:data:`MAX_DELAY_MS`, with "full jitter" (a random delay between half and all of it), so a
burst of failures does not retry in lockstep.
"""

from __future__ import annotations

import random

__all__ = ["BACKOFFS", "MAX_DELAY_MS", "MIN_EXPONENTIAL_BASE_MS", "attempts_left", "retry_delay_ms"]

BACKOFFS = ("fixed", "exponential")
#: Longest delay exponential backoff produces: one day.
MAX_DELAY_MS = 24 * 3600 * 1000
#: Base delay of exponential backoff when the job's delay is 0.
MIN_EXPONENTIAL_BASE_MS = 1000


def retry_delay_ms(
    backoff: str, base_delay_ms: int, attempt: int, rng: random.Random | None = None
) -> int:
    """Delay before the attempt after ``attempt`` (1-based) failed."""
    if backoff != "exponential":
        return max(0, base_delay_ms)
    base = base_delay_ms or MIN_EXPONENTIAL_BASE_MS
    ceiling = min(MAX_DELAY_MS, base * 2 ** min(max(attempt - 1, 0), 40))
    return int((rng or random).uniform(ceiling / 2, ceiling))


def attempts_left(attempt: int, max_attempts: int | None) -> bool:
    """True if a job on attempt ``attempt`` may be tried again."""
    return max_attempts is None or attempt < max_attempts
