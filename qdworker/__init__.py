"""qdworker: a Postgres-backed background job worker for trio and asyncio apps.

Jobs are rows in ``worker_jobs``; ``python -m qdworker`` runs the workers. The public API is
what ``__all__`` lists; every other module is private.
"""

from __future__ import annotations

from .client import Queue
from .config import Config
from .events.tokens import ws_token
from .errors import (
    ConfigError,
    DatabaseError,
    EmbeddedDatabaseError,
    InvalidJobError,
    JobTypeError,
    MigrationError,
    QdworkerError,
    TokenError,
)
from .model import Job
from .registry import job
from .worker.context import JobContext

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DatabaseError",
    "EmbeddedDatabaseError",
    "InvalidJobError",
    "Job",
    "JobContext",
    "JobTypeError",
    "MigrationError",
    "QdworkerError",
    "Queue",
    "TokenError",
    "__version__",
    "job",
    "ws_token",
]
