"""Retry delays and attempt limits.

QuickDapp retries a failed job with ``auto_reschedule_on_failure`` forever, every
``auto_reschedule_on_failure_delay`` milliseconds: that stays the default (``backoff='fixed'``,
``max_attempts`` NULL), and the delay stays the *minimum*. ``backoff='exponential'`` doubles
the delay per attempt, capped at :data:`MAX_DELAY_MS`, with "full jitter" (a random delay
between half and all of it), so a burst of failures does not retry in lockstep.

A floor keeps a chain that keeps failing fast from turning into a storm of rows: the retry
after attempt *n* waits at least ``min(2^(n-1), 60)`` seconds (1 s, 2 s, 4 s … then once a
minute), whatever the job's delay. So no retry chain inserts more than about six rows in its
first minute and one a minute after that. (QuickDapp's own loop slept a second after every
job, so its delay 0 also meant about a second.)
"""

from __future__ import annotations

import random
from typing import Final

BACKOFFS: Final = ("fixed", "exponential")
#: Longest delay exponential backoff produces: one day.
MAX_DELAY_MS: Final = 24 * 3600 * 1000
#: Base delay of exponential backoff when the job's delay is 0.
MIN_EXPONENTIAL_BASE_MS: Final = 1000
#: The retry floor starts at this and doubles per attempt ...
FLOOR_BASE_MS: Final = 1000
#: ... up to this.
FLOOR_MAX_MS: Final = 60_000


def floor_ms(attempt: int) -> int:
    """The shortest delay before the attempt after ``attempt`` (1-based) failed."""
    return min(FLOOR_MAX_MS, FLOOR_BASE_MS << min(max(attempt - 1, 0), 16))


def retry_delay_ms(
    backoff: str, base_delay_ms: int, attempt: int, rng: random.Random | None = None
) -> int:
    """Delay before the attempt after ``attempt`` (1-based) failed (never below the floor)."""
    if backoff != "exponential":
        return max(base_delay_ms, floor_ms(attempt))
    base = base_delay_ms or MIN_EXPONENTIAL_BASE_MS
    ceiling = min(MAX_DELAY_MS, base * 2 ** min(max(attempt - 1, 0), 40))
    delay = int((rng or random).uniform(ceiling / 2, ceiling))
    return max(delay, floor_ms(attempt))


def attempts_left(attempt: int, max_attempts: int | None) -> bool:
    """True if a job on attempt ``attempt`` may be tried again."""
    return max_attempts is None or attempt < max_attempts
