"""The hub's counters, their snapshot (:class:`HubStatistics`) and the rate-limited warning
about malformed payloads.

:class:`HubCounters` is shared by the hub and its clients, which bump it on every publish,
enqueue and overflow; :meth:`HubCounters.note_invalid` counts a dropped malformed payload and
logs a warning at most once per :data:`INVALID_LOG_INTERVAL_SECONDS` (the payload shown is
truncated to :data:`INVALID_LOG_SHOWN_CHARS` characters). Nothing here raises or owns
resources beyond a few integers. Logs under ``qdworker._events.hub``, the public module's name.
Not thread-safe: used from the trio thread of the websocket server only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Final

logger = logging.getLogger("qdworker.events.hub")

INVALID_LOG_INTERVAL_SECONDS: Final = 10.0
"""Minimum spacing of warnings about dropped malformed IPC payloads."""
INVALID_LOG_SHOWN_CHARS: Final = 200
"""Characters of a dropped payload's ``repr`` shown in the warning."""


@dataclass(frozen=True, slots=True)
class HubStatistics:
    """Point-in-time counters.  ``published`` counts accepted messages/events;
    ``delivered`` counts (message, client) enqueues; ``dropped_clients``
    counts queue overflows; ``invalid`` counts malformed payloads dropped."""

    clients: int
    admin_clients: int
    anonymous_clients: int
    users: int
    published: int
    delivered: int
    dropped_clients: int
    invalid: int


class HubCounters:
    """Running totals behind :class:`HubStatistics` (plain attributes, bumped in place)."""

    __slots__ = ("_last_invalid_log", "delivered", "dropped_clients", "invalid", "published")

    def __init__(self) -> None:
        self.published = 0
        self.delivered = 0
        self.dropped_clients = 0
        self.invalid = 0
        self._last_invalid_log = -INVALID_LOG_INTERVAL_SECONDS

    def note_invalid(self, what: str, payload: Any) -> None:
        """Count a dropped malformed payload; warn at most once per interval."""
        self.invalid += 1
        now = time.monotonic()
        if now - self._last_invalid_log >= INVALID_LOG_INTERVAL_SECONDS:
            self._last_invalid_log = now
            shown = repr(payload)
            if len(shown) > INVALID_LOG_SHOWN_CHARS:
                shown = shown[:INVALID_LOG_SHOWN_CHARS] + "..."
            logger.warning("dropping %s (%d dropped so far): %s", what, self.invalid, shown)
