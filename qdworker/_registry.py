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

A job module may also declare what every supervisor ensures at start (supervisors import the
same modules for that, and never name one): cron jobs, with :func:`cron`, and start-up work,
with :func:`on_startup`::

    cron("watchChain", "*/3 * * * * *", retry_delay_ms=10_000)

    @on_startup
    async def submit_deploy(db, timezone):   # db: a Database (execute), timezone: str
        await db.execute("INSERT INTO worker_jobs ...")

Handlers are typed against :class:`Context`, the protocol the worker's context implements.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from ._model import Job
from .errors import JobTypeError

Runtime = Literal["trio", "thread", "asyncio"]
F = TypeVar("F", bound=Callable[..., Any])

MAX_TYPE_CHARS = 255

_types: dict[str, JobType] = {}


class Database(Protocol):
    """SQL on the job's database (``ctx.db``, and a start-up hook's ``db``)."""

    async def execute(self, sql: str, params: Any = None, /) -> list[dict[str, Any]]: ...


class ContextDatabase(Database, Protocol):
    """``ctx.db``: SQL on the job's database, and its URL for a connection of one's own."""

    @property
    def url(self) -> str: ...


class Context(Protocol):
    """What a handler gets (the worker's ``JobContext`` implements it; so does the context of
    ``runtime="asyncio"`` handlers, whose coroutines are asyncio's)."""

    #: The job as claimed (every column of its row).
    job: Job
    #: The worker running it (``host:pid:wN.M``).
    worker_id: str

    @property
    def db(self) -> ContextDatabase:
        """SQL on the job's database (:class:`ContextDatabase`)."""
        ...

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the job's id and type and the worker's id."""
        ...

    async def notify_user(self, user_id: int, message: Mapping[str, Any]) -> None:
        """Send ``message`` (a JSON object) to the websocket clients of ``user_id``."""
        ...

    async def broadcast(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` (a JSON object) to every websocket client."""
        ...

    async def parents(self) -> Mapping[int, Any]:
        """The results of the jobs in ``job.depends_on`` by id (each retry chain's last
        row), read with one statement on first call; empty for a job without parents."""
        ...


@dataclass(frozen=True)
class CronJob:
    """A cron job a job module declares: supervisors ensure one live row of its chain.
    ``module`` is the declaring module's name."""

    type: str
    schedule: str
    retry_delay_ms: int
    module: str = ""

    @property
    def tag(self) -> str:
        """The tag of its rows, ``cron:<type>``."""
        return f"cron:{self.type}"


#: ``hook(db, timezone)``: start-up work a job module declares (run by every supervisor).
StartupHook = Callable[[Database, str], Awaitable[None]]

_cron_jobs: dict[str, CronJob] = {}
_startup_hooks: list[StartupHook] = []


def _declared_in(module: str, modules: Iterable[str]) -> bool:
    return any(module == m or module.startswith(m + ".") for m in modules)


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


def cron(type: str, schedule: str, *, retry_delay_ms: int) -> CronJob:
    """Declare a cron job of type ``type`` (6 fields, seconds first, or 5), retried after
    ``retry_delay_ms`` on failure: supervisors ensure it at start (tag ``cron:<type>``). The
    calling module is its declarer (see :func:`cron_jobs`)."""
    caller = inspect.currentframe()
    module = str(caller.f_back.f_globals.get("__name__", "")) if caller and caller.f_back else ""
    declared = CronJob(type, schedule, retry_delay_ms, module)
    _cron_jobs[type] = declared
    return declared


def on_startup(hook: StartupHook) -> StartupHook:
    """Declare start-up work (a coroutine ``hook(db, timezone)``) every supervisor runs once
    the schema is up to date; it must be safe to run again and from several supervisors."""
    if hook not in _startup_hooks:
        _startup_hooks.append(hook)
    return hook


def cron_jobs(modules: Iterable[str]) -> tuple[CronJob, ...]:
    """The cron jobs declared by ``modules`` (or modules inside those packages)."""
    names = tuple(modules)
    return tuple(c for c in _cron_jobs.values() if _declared_in(c.module, names))


def startup_hooks(modules: Iterable[str]) -> tuple[StartupHook, ...]:
    """The start-up hooks declared by ``modules`` (or modules inside those packages)."""
    names = tuple(modules)
    return tuple(h for h in _startup_hooks if _declared_in(h.__module__, names))


def get(name: str) -> JobType | None:
    return _types.get(name)


def registered() -> dict[str, JobType]:
    """A copy of the table, by name."""
    return dict(_types)


def import_modules(modules: Iterable[str]) -> None:
    """Import each module (registering its job types). Import errors propagate unchanged."""
    for module in modules:
        importlib.import_module(module)
