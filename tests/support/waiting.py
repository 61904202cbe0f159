"""The suite's one way to wait for an outcome: check it until it holds, within a deadline.

A bounded wait on what the test asserts, not a sleep standing in for synchronisation: the
check runs every :data:`INTERVAL_SECONDS` until it returns something truthy, which is returned;
past the deadline the test fails, saying what it waited for and what it last saw.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

INTERVAL_SECONDS = 0.02


def wait_until(check: Callable[[], T], timeout: float = 20, *, what: str = "") -> T:
    """Call ``check()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or check}: {value!r}"
            )
        time.sleep(INTERVAL_SECONDS)


async def wait_until_async(check: Callable[[], Any]) -> Any:
    """The same in a trio test, where the caller caps the wait (``trio.fail_after``);
    ``check`` may be a coroutine function."""
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await trio.sleep(INTERVAL_SECONDS)
