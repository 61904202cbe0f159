"""Logging set-up for the supervisor and worker processes.

:func:`setup` installs one handler on the root logger (replacing the one a previous call
installed, so it is safe to call twice) writing to stderr:

* ``text`` (default): ``2025-01-31T12:00:00.123Z info  qdworker._worker.runner [w=host:1:w0.1
  job=42 type=sendEmail] message``; the bracket shows only the fields a record has.
* ``json``: one JSON object per line with ``ts``, ``level``, ``logger``, ``msg``, the context
  fields ``worker_id``, ``job_id``, ``job_type`` when set, any other ``extra=`` fields, and
  ``exc`` (the formatted traceback) when there is one.

Levels are QuickDapp's (:data:`qdworker._config.LOG_LEVELS`): ``trace`` (5, below ``debug``),
``debug``, ``info``, ``warn``, ``error``. The worker id is process-wide: :func:`setup` puts it
on every record that passes the handler. Job lines carry ``job_id`` / ``job_type`` given as
``extra=`` (e.g. from a :class:`logging.LoggerAdapter`).

Passwords: code logs URLs through :func:`qdworker._redact.redact`; as a safety net the
formatted line is passed through it too, so ``scheme://user:secret@`` and ``password=...``
never reach the output. Formatting never raises: a value JSON cannot encode is logged as its
``repr``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, TextIO

from ._config import LOG_LEVELS
from ._model import Job
from ._redact import redact


def module_logger(name: str) -> logging.Logger:
    """The logger of the module named ``name`` (pass ``__name__``), named without the private
    underscores: ``qdworker._worker.claimer`` logs as ``qdworker.worker.claimer``, so log
    lines and logging configuration do not depend on the package's private layout.
    """
    parts = (p[1:] if p.startswith("_") and not p.startswith("__") else p for p in name.split("."))
    return logging.getLogger(".".join(parts))


#: Python level number of QuickDapp's ``trace``.
TRACE: Final = LOG_LEVELS["trace"]
#: Record attributes shown as context (in this order) when they are set.
CONTEXT_FIELDS: Final = ("worker_id", "job_id", "job_type")

_SHORT_CONTEXT: Final = {"worker_id": "w", "job_id": "job", "job_type": "type"}
_LEVEL_NAMES: Final = {number: name for name, number in LOG_LEVELS.items()}
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)

logging.addLevelName(TRACE, "TRACE")


def trace(logger: logging.Logger, msg: str, *args: Any, **kwargs: Any) -> None:
    """Log ``msg`` at QuickDapp's ``trace`` level (below debug)."""
    if logger.isEnabledFor(TRACE):
        logger.log(TRACE, msg, *args, **kwargs)


def level_name(levelno: int) -> str:
    """QuickDapp's name for a Python level (``warn``, not ``warning``; critical is ``error``)."""
    if levelno in _LEVEL_NAMES:
        return _LEVEL_NAMES[levelno]
    if levelno > LOG_LEVELS["error"]:
        return "error"
    return logging.getLevelName(levelno).lower()


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class _ContextFilter(logging.Filter):
    """Adds the process-wide worker id to every record that has none."""

    def __init__(self, worker_id: str | None) -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "worker_id", None) is None:
            record.worker_id = self.worker_id
        return True


class TextFormatter(logging.Formatter):
    """Human-readable lines (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        context = " ".join(
            f"{_SHORT_CONTEXT[name]}={value}"
            for name in CONTEXT_FIELDS
            if (value := getattr(record, name, None)) is not None
        )
        line = f"{_timestamp(record)} {level_name(record.levelno):<5} {record.name}"
        if context:
            line += f" [{context}]"
        line += f" {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": level_name(record.levelno),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and name not in CONTEXT_FIELDS and name[:1] != "_":
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return redact(json.dumps(entry, default=repr, ensure_ascii=False))


_installed: logging.Handler | None = None


def for_job(logger: logging.Logger, job: Job) -> logging.LoggerAdapter[logging.Logger]:
    """``logger`` with ``job``'s id and type on every line (``job=… type=…``, or the JSON
    fields ``job_id`` / ``job_type``): the one way job lines get them."""
    return logging.LoggerAdapter(logger, {"job_id": job.id, "job_type": job.type})


def setup(
    level: str = "info",
    fmt: str = "text",
    worker_id: str | None = None,
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Configure the root logger: ``level`` (a QuickDapp level name), ``fmt`` (``text`` or
    ``json``), ``worker_id`` on every record. Replaces the handler of a previous call; leaves
    handlers installed by others alone. Returns the handler. Raises ``ValueError`` on an unknown
    level or format (:mod:`qdworker._config` validates both before they get here)."""
    global _installed
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    formatter: logging.Formatter
    if fmt == "text":
        formatter = TextFormatter()
    elif fmt == "json":
        formatter = JsonFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r}: expected text or json")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    handler.addFilter(_ContextFilter(worker_id))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(LOG_LEVELS[level])
    _installed = handler
    return handler
