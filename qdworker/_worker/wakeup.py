"""A level-triggered wake-up flag for one waiting task."""

from __future__ import annotations

import trio


class Wakeup:
    """``set()`` from anywhere in the trio thread; :meth:`wait_until` consumes it.

    A ``set()`` that happens while nobody waits is kept, so a notification arriving during a
    claim is never lost: the next wait returns at once.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait_until(self, deadline: float) -> bool:
        """Wait until set or ``deadline`` (trio clock). Returns True if woken by ``set()``."""
        with trio.move_on_at(deadline):
            await self._event.wait()
        woken = self._event.is_set()
        if woken:
            self._event = trio.Event()
        return woken
