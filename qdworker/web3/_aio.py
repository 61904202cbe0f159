"""The one place the web3 part touches trio-asyncio (untyped): trio code called from asyncio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio_asyncio


def trio_as_aio(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a trio coroutine function) callable and awaitable from asyncio code."""
    wrapped: Callable[..., Any] = trio_asyncio.trio_as_aio(fn)
    return wrapped


def trio_executor(max_workers: int) -> Any:
    """An executor trio-asyncio's loop accepts in ``run_in_executor`` (threads via trio)."""
    return trio_asyncio.TrioExecutor(max_workers=max_workers)
