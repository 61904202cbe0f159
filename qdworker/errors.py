"""The exceptions qdworker raises, in one tree.

::

    QdworkerError                      every qdworker error; catch this to catch them all
    ├── ConfigError                    an environment variable or flag has an invalid value
    ├── DatabaseError                  Postgres refused or failed a statement (.sqlstate)
    │   ├── DatabaseUnavailableError   no connection: the statement was certainly not run
    │   ├── OutcomeUnknownError        the connection broke after the statement was sent:
    │   │                              it may or may not have been committed
    │   └── MigrationError             the schema could not be brought up to date
    ├── ClaimLostError                 a job's run no longer holds its claim (fencing)
    ├── EmbeddedDatabaseError          the embedded Postgres could not start or be reached
    ├── InvalidJobError (ValueError)   API input (a job, a filter) rejected before anything runs
    ├── InvalidQueueError (ValueError) queue settings rejected before anything is written
    ├── JobTypeError                   two handlers for one job type, or a bad @job() use
    └── TokenError                     a websocket token is expired, forged or malformed (.code)

psycopg's errors are translated into this tree in one place,
:func:`qdworker._db.connect.translate`; no psycopg exception leaves qdworker's API.

Errors raised inside a job handler are not wrapped: they fail that job (its ``result`` says
``{"error": message, "error_type": class name}``) and never reach the caller of the worker.
"""

from __future__ import annotations

__all__ = [
    "ClaimLostError",
    "ConfigError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "EmbeddedDatabaseError",
    "InvalidJobError",
    "InvalidQueueError",
    "JobTypeError",
    "MigrationError",
    "OutcomeUnknownError",
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


class DatabaseUnavailableError(DatabaseError):
    """No usable connection: the database refused or did not answer, or the connection was
    found broken before the statement was sent. Nothing was written; retrying is safe."""


class OutcomeUnknownError(DatabaseError):
    """The connection broke (or did not answer in time) after the statement was sent, so
    whether it was committed is unknown: check before repeating a non-idempotent write."""


class MigrationError(DatabaseError):
    """A migration failed or the recorded migrations do not match the files."""


class ClaimLostError(QdworkerError):
    """This run of the job no longer holds its claim (its lease was lost and the job was
    rescued by another worker, or it finished by another path): its work must not commit."""


class EmbeddedDatabaseError(QdworkerError):
    """The embedded Postgres could not be initialised, started, reached or stopped."""


class InvalidJobError(QdworkerError, ValueError):
    """A job submitted through the API, or a filter or limit given to it (dead-job listing
    and redrive), is invalid; nothing was written."""


class InvalidQueueError(QdworkerError, ValueError):
    """Queue settings given through the API are invalid; nothing was written."""


class JobTypeError(QdworkerError):
    """A job type is registered twice, or ``@job`` is used on something it cannot run."""


class TokenError(QdworkerError):
    """A websocket token was refused. ``code`` is the documented error code sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
