"""Job types: the ``@job`` decorator and the table of registered handlers.

::

    @job("sendEmail", timeout=60.0)
    async def send_email(ctx): ...          # a trio coroutine

    @job("resize")
    def resize(ctx): ...                    # plain def: runs in a worker thread

    @job("fetch", runtime="asyncio")
    async def fetch(ctx): ...               # asyncio code, run through trio-asyncio

Worker processes import the modules named by ``QDWORKER_JOBS`` (or ``--jobs``); importing
registers their types. Registering a second, different handler under a taken name raises
:class:`~qdworker.errors.JobTypeError` naming both.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from .errors import JobTypeError

__all__ = ["JobType", "Runtime", "get", "import_modules", "job", "registered"]

Runtime = Literal["trio", "thread", "asyncio"]
F = TypeVar("F", bound=Callable[..., Any])

MAX_TYPE_CHARS = 255

_types: dict[str, JobType] = {}


@dataclass(frozen=True)
class JobType:
    """A registered job type: its name, handler, how it runs and its default timeout."""

    name: str
    handler: Callable[..., Any]
    runtime: Runtime
    timeout: float | None

    @property
    def where(self) -> str:
        return f"{self.handler.__module__}.{self.handler.__qualname__}"


def job(
    name: str, *, timeout: float | None = None, runtime: Literal["trio", "asyncio"] | None = None
) -> Callable[[F], F]:
    """Register the decorated function as the handler of job type ``name``.

    ``timeout`` (seconds) cancels a run that takes longer (a job's ``timeout_seconds`` column
    overrides it). ``runtime="asyncio"`` runs an ``async def`` through trio-asyncio.
    """
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_TYPE_CHARS:
        raise JobTypeError(
            f"job type name must be a non-empty string of at most {MAX_TYPE_CHARS} characters"
        )
    if timeout is not None and (not timeout > 0 or not math.isfinite(timeout)):
        raise JobTypeError(f"job {name!r}: timeout must be a number of seconds > 0")

    def register(fn: F) -> F:
        is_async = inspect.iscoroutinefunction(fn)
        if runtime == "asyncio" and not is_async:
            raise JobTypeError(f"job {name!r}: runtime='asyncio' needs an async def handler")
        kind: Runtime = ("asyncio" if runtime == "asyncio" else "trio") if is_async else "thread"
        new = JobType(name, fn, kind, timeout)
        old = _types.get(name)
        if old is not None and old.where != new.where:
            raise JobTypeError(
                f"job type {name!r} is registered twice: by {old.where} and by {new.where}"
            )
        _types[name] = new
        return fn

    return register


def get(name: str) -> JobType | None:
    return _types.get(name)


def registered() -> dict[str, JobType]:
    """A copy of the table, by name."""
    return dict(_types)


def import_modules(modules: Iterable[str]) -> None:
    """Import each module (registering its job types). Import errors propagate unchanged."""
    for module in modules:
        importlib.import_module(module)
