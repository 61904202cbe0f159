"""qdworker: a Postgres-backed background job worker for trio and asyncio apps.

Jobs are rows in ``worker_jobs``; ``python -m qdworker`` runs the workers. This module is the
public API, with :mod:`qdworker.errors` (every exception), :mod:`qdworker.testing` (the test
kit) and :mod:`qdworker.web3` (the optional web3 job types). Every module whose name starts
with an underscore is private: its names may change in any release.
"""

from __future__ import annotations

from ._client import CancelOutcome, Queue
from ._config import Config
from ._events.tokens import ws_token
from ._model import Batch, Job, JobStatus
from ._queues import QueueInfo
from ._registry import Context, CronJob, cron, job, on_startup
from ._supervisor.main import Manager, serve
from ._worker.context import JobContext
from .errors import (
    ClaimLostError,
    ConfigError,
    DatabaseError,
    DatabaseUnavailableError,
    EmbeddedDatabaseError,
    InvalidJobError,
    InvalidQueueError,
    JobTypeError,
    MigrationError,
    OutcomeUnknownError,
    QdworkerError,
    TokenError,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CancelOutcome",
    "ClaimLostError",
    "Config",
    "ConfigError",
    "Context",
    "CronJob",
    "DatabaseError",
    "DatabaseUnavailableError",
    "EmbeddedDatabaseError",
    "InvalidJobError",
    "InvalidQueueError",
    "Job",
    "JobContext",
    "JobStatus",
    "JobTypeError",
    "Manager",
    "MigrationError",
    "OutcomeUnknownError",
    "QdworkerError",
    "Queue",
    "QueueInfo",
    "TokenError",
    "__version__",
    "cron",
    "job",
    "on_startup",
    "serve",
    "ws_token",
]
