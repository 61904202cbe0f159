"""The frozen configuration: the only place that reads the environment.

Every setting has one environment variable (QuickDapp's names where QuickDapp has the
setting, ``QDWORKER_*`` otherwise) and one command-line flag; a flag overrides the
variable. :func:`load` validates everything at once and raises :class:`~qdworker.errors.ConfigError`
with one line naming the variable and the accepted values for the first bad one.

Each setting is declared once, as a field of :class:`Config` (:func:`setting`); the table
:data:`SETTINGS` derived from those fields drives parsing, the CLI's ``--help`` and the README's
table.
"""

from __future__ import annotations

import dataclasses
import os
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._redact import redact
from .errors import ConfigError

#: QuickDapp's log levels, mapped to Python's (``trace`` is below ``debug``).
LOG_LEVELS: Mapping[str, int] = {"trace": 5, "debug": 10, "info": 20, "warn": 30, "error": 40}

DEFAULT_WS_PORT = 8765
DEFAULT_HTTP_PORT = 8766


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError
        return value

    parse.__doc__ = f"an integer >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    """a number > 0 (seconds)"""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def _non_negative_float(text: str) -> float:
    """a number >= 0 (seconds)"""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError
    return value


def _worker_count(text: str) -> int:
    """an integer >= 0, or 'cpus' (one per CPU)"""
    if text.strip().lower() == "cpus":
        return os.cpu_count() or 1
    return _int_at_least(0)(text)


def _log_level(text: str) -> str:
    """one of trace, debug, info, warn, error"""
    level = text.strip().lower()
    level = "warn" if level == "warning" else level
    if level not in LOG_LEVELS:
        raise ValueError
    return level


def _bool(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off"""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _text(text: str) -> str:
    """a non-empty string"""
    if not text.strip():
        raise ValueError
    return text.strip()


def _optional_text(text: str) -> str | None:
    """a string (empty means unset)"""
    return text or None


def _list(text: str) -> tuple[str, ...]:
    """a comma-separated list"""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _path(text: str) -> Path:
    """a folder path"""
    if not text.strip():
        raise ValueError
    return Path(text).expanduser()


def _log_format(text: str) -> str:
    """text or json"""
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError
    return value


def _timezone(text: str) -> str:
    """an IANA time zone name such as UTC or Europe/Berlin"""
    try:
        zoneinfo.ZoneInfo(text.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError from exc
    return text.strip()


def _port(text: str) -> int:
    """a TCP port 0-65535 (0 picks a free one)"""
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


@dataclass(frozen=True)
class Setting:
    """One configuration entry: its field, environment variable, flag, parser and help."""

    field: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    flag_allowed: bool = True  # False for secrets: a flag would show in `ps`

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def accepted(self) -> str:
        return (self.parse.__doc__ or "a valid value").strip()


def setting(
    env: str,
    parse: Callable[[str], Any],
    default: Any,
    help: str,
    *,
    flag: bool = True,
    repr: bool = True,
) -> Any:
    """Declare a :class:`Config` field as a setting: its environment variable, parser (whose
    docstring says what it accepts), default and help; ``flag=False`` for secrets (a flag
    would show in ``ps``), ``repr=False`` to keep it out of ``repr()``."""
    return field(
        default=default,
        repr=repr,
        metadata={"env": env, "parse": parse, "help": help, "flag": flag},
    )


@dataclass(frozen=True)
class Config:
    """Every setting of a qdworker process, each declared once, here: its type, default,
    environment variable, parser and help. Build it with :meth:`from_env` or with keyword
    arguments (parsed values); never mutate it.

    ``repr()`` hides the database URL's password and the websocket secret.
    """

    # fmt: off
    database_url: str | None = setting(
        "DATABASE_URL", _optional_text, None,
        "Postgres URL; unset: start the embedded Postgres in the data dir", repr=False,
    )
    worker_count: int = setting(
        "WORKER_COUNT", _worker_count, 1, "worker processes ('cpus' = one per CPU, 0 = none)",
    )
    worker_log_level: str = setting(
        "WORKER_LOG_LEVEL", _log_level, "info", "log level of worker processes",
    )
    log_level: str = setting("LOG_LEVEL", _log_level, "info", "log level of the supervisor")
    log_format: str = setting("QDWORKER_LOG_FORMAT", _log_format, "text", "log line format")
    jobs: tuple[str, ...] = setting(
        "QDWORKER_JOBS", _list, (),
        "modules to import in every worker (their @job types are registered)",
    )
    queues: tuple[str, ...] = setting(
        "QDWORKER_QUEUES", _list, (),
        "queues the workers serve, e.g. 'default,emails' (empty = every queue)",
    )
    data_dir: Path = setting(
        "QDWORKER_DATA_DIR", _path, Path(".qdworker"), "data folder of the embedded Postgres",
    )
    migrate: bool = setting(
        "QDWORKER_MIGRATE", _bool, True, "apply migrations when the supervisor starts",
    )
    concurrency: int = setting(
        "QDWORKER_CONCURRENCY", _int_at_least(1), 10, "jobs run at once by each worker process",
    )
    poll_interval: float = setting(
        "QDWORKER_POLL_INTERVAL", _positive_float, 5.0,
        "seconds between safety-net polls when no NOTIFY arrives",
    )
    lease_seconds: float = setting(
        "QDWORKER_LEASE_SECONDS", _positive_float, 30.0,
        "lease of a running job; renewed while its worker lives",
    )
    shutdown_timeout: float = setting(
        "QDWORKER_SHUTDOWN_TIMEOUT", _positive_float, 30.0,
        "seconds running jobs get to finish on SIGINT/SIGTERM",
    )
    max_lost_runs: int = setting(
        "QDWORKER_MAX_LOST_RUNS", _int_at_least(1), 3,
        "runs of a job lost with their worker before it fails, when it has no max_attempts",
    )
    timezone: str = setting("QDWORKER_TIMEZONE", _timezone, "UTC", "time zone of cron schedules")
    db_timeout: float = setting(
        "QDWORKER_DB_TIMEOUT", _positive_float, 10.0,
        "seconds after which a silent database connection counts as dead (keepalives, "
        "tcp_user_timeout) and qdworker's own statements time out",
    )
    startup_timeout: float = setting(
        "QDWORKER_STARTUP_TIMEOUT", _non_negative_float, 10.0,
        "seconds the supervisor waits for the database at start before it exits with an error",
    )
    unknown_type_timeout: float = setting(
        "QDWORKER_UNKNOWN_TYPE_TIMEOUT", _positive_float, 600.0,
        "seconds a due job waits for a live worker that knows its type before it fails "
        "with UnknownJobType",
    )
    dead_job_retention: float = setting(
        "QDWORKER_DEAD_JOB_RETENTION", _non_negative_float, 0.0,
        "seconds cleanup keeps a dead job after it died, even past its remove_at "
        "(0 = removed like every other finished job)",
    )
    ws_enabled: bool = setting("QDWORKER_WS", _bool, True, "run the websocket server")
    ws_host: str = setting("QDWORKER_WS_HOST", _text, "127.0.0.1", "websocket server address")
    ws_port: int = setting(
        "QDWORKER_WS_PORT", _port, DEFAULT_WS_PORT,
        "websocket server port (0 = any free port, logged)",
    )
    ws_secret: str | None = setting(
        "QDWORKER_WS_SECRET", _optional_text, None,
        "HS256 secret of websocket tokens; unset = development mode (loopback, all admin)",
        flag=False, repr=False,
    )
    ws_origins: tuple[str, ...] = setting(
        "QDWORKER_WS_ORIGINS", _list, (),
        "allowed Origin headers of websocket clients (empty = any)",
    )
    ws_max_total_connections: int = setting(
        "SOCKET_MAX_TOTAL_CONNECTIONS", _int_at_least(1), 10000, "websocket connections in all",
    )
    ws_max_connections_per_user: int = setting(
        "SOCKET_MAX_CONNECTIONS_PER_USER", _int_at_least(1), 5, "websocket connections per user",
    )
    http_enabled: bool = setting(
        "QDWORKER_HTTP", _bool, True,
        "serve the dashboard, /metrics, /healthz and /readyz over HTTP",
    )
    http_host: str = setting(
        "QDWORKER_HTTP_HOST", _text, "127.0.0.1",
        "HTTP address (not loopback: needs QDWORKER_WS_SECRET, whose tokens it takes)",
    )
    http_port: int = setting(
        "QDWORKER_HTTP_PORT", _port, DEFAULT_HTTP_PORT, "HTTP port (0 = any free port, logged)",
    )
    # fmt: on

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        url = None if self.database_url is None else redact(self.database_url)
        return f"Config(database_url={url!r}, {shown})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """The settings as ``python -m qdworker`` reads them, from ``environ`` (default
        ``os.environ``). Raises :class:`~qdworker.errors.ConfigError` naming the first bad
        variable."""
        return load(environ)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (values already parsed)."""
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce this config (for child processes)."""
        env: dict[str, str] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if value is None:
                continue
            if isinstance(value, tuple):
                env[setting.env] = ",".join(value)
            elif isinstance(value, bool):
                env[setting.env] = "true" if value else "false"
            else:
                env[setting.env] = str(value)
        return env


#: The settings, in declaration order: they drive parsing, the CLI's flags and ``--help``, and
#: the README's table.
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(
        f.name,
        f.metadata["env"],
        f.metadata["parse"],
        f.default,
        f.metadata["help"],
        f.metadata["flag"],
    )
    for f in dataclasses.fields(Config)
)
_BY_FIELD = {s.field: s for s in SETTINGS}


def load(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, str | None] | None = None
) -> Config:
    """Build a :class:`Config` from ``environ`` (default ``os.environ``) and raw ``overrides``.

    ``overrides`` maps field names to unparsed strings (command-line flags); ``None`` values are
    ignored. Raises :class:`ConfigError` naming the variable (or flag) on the first bad value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw: str | None = None
        source = setting.env
        if overrides is not None and overrides.get(setting.field) is not None:
            raw, source = overrides[setting.field], setting.flag
        elif setting.env in env:
            raw = env[setting.env]
        if raw is None:
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError:
            raise ConfigError(f"{source}={raw!r} is invalid: expected {setting.accepted}") from None
    unknown = set(overrides or ()) - set(_BY_FIELD)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return Config(**values)
