"""The exceptions qdworker raises, in one tree.

::

    QdworkerError                      every qdworker error; catch this to catch them all
    ├── ConfigError                    an environment variable or flag has an invalid value
    ├── DatabaseError                  Postgres refused or failed a statement (.sqlstate)
    │   └── MigrationError             the schema could not be brought up to date
    ├── EmbeddedDatabaseError          the embedded Postgres could not start or be reached
    ├── InvalidJobError (ValueError)   submit_job() input rejected before anything is written
    ├── JobTypeError                   two handlers for one job type, or a bad @job() use
    └── TokenError                     a websocket token is expired, forged or malformed (.code)

Errors raised inside a job handler are not wrapped: they fail that job (its ``result`` says
``{"error": message, "error_type": class name}``) and never reach the caller of the worker.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseError",
    "EmbeddedDatabaseError",
    "InvalidJobError",
    "JobTypeError",
    "MigrationError",
    "QdworkerError",
    "TokenError",
]


class QdworkerError(Exception):
    """Base class of every error qdworker raises."""


class ConfigError(QdworkerError):
    """A setting is invalid. The message names the variable (or flag) and the accepted values."""


class DatabaseError(QdworkerError):
    """A statement failed. ``sqlstate`` is Postgres' five-character error code, if known."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class MigrationError(DatabaseError):
    """A migration failed or the recorded migrations do not match the files."""


class EmbeddedDatabaseError(QdworkerError):
    """The embedded Postgres could not be initialised, started, reached or stopped."""


class InvalidJobError(QdworkerError, ValueError):
    """A job submitted through the API is invalid; nothing was written."""


class JobTypeError(QdworkerError):
    """A job type is registered twice, or ``@job`` is used on something it cannot run."""


class TokenError(QdworkerError):
    """A websocket token was refused. ``code`` is the documented error code sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
